use std::fmt;

use half::{bf16, f16};

use crate::storage::CpuStorage;

/// Element types a tensor can hold. Floats for compute (bf16/f16 in mixed
/// precision, f32 master weights, f64 for finite-difference checks) and u32 for
/// token ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    BF16,
    F16,
    U32,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F64 => 8,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// The dtype of per-row statistics (LayerNorm mean and 1/std, attention
    /// log-sum-exp, per-position losses) kept beside activations of this dtype:
    /// f32 for half types, whose 8 or 11 bits of mantissa would spoil them.
    pub fn stats_dtype(self) -> DType {
        match self {
            DType::BF16 | DType::F16 => DType::F32,
            other => other,
        }
    }

    pub fn is_float(self) -> bool {
        !matches!(self, DType::U32)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::U32 => "u32",
        };
        f.write_str(s)
    }
}

/// A Rust type that can be the element of a CPU tensor.
pub trait Element: Copy + Send + Sync + bytemuck::Pod + 'static {
    const DTYPE: DType;
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
    fn into_storage(v: Vec<Self>) -> CpuStorage;
    /// Lossy conversion used by casts; integers go through f64 exactly up to 2^53.
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

macro_rules! element {
    ($t:ty, $variant:ident, $to:expr, $from:expr) => {
        impl Element for $t {
            const DTYPE: DType = DType::$variant;
            fn slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn into_storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
            fn to_f64(self) -> f64 {
                let f: fn($t) -> f64 = $to;
                f(self)
            }
            fn from_f64(v: f64) -> Self {
                let f: fn(f64) -> $t = $from;
                f(v)
            }
        }
    };
}

element!(f32, F32, |x| x as f64, |v| v as f32);
element!(f64, F64, |x| x, |v| v);
element!(bf16, BF16, |x| x.to_f64(), bf16::from_f64);
element!(f16, F16, |x| x.to_f64(), f16::from_f64);
element!(u32, U32, |x| x as f64, |v| v as u32);

/// The float types the CPU reference kernels are generic over: f32 for training,
/// f64 for finite-difference gradient checks. Half types are storage formats on
/// the CPU; their compute lives in the CUDA backend.
pub trait Float:
    Element + num_traits::Float + std::iter::Sum + std::ops::AddAssign + std::ops::SubAssign + fmt::Debug
{
    fn from_f32(v: f32) -> Self;
    fn from_usize(v: usize) -> Self;
    /// The error function (num_traits has none; libm's is correctly rounded to about 1 ulp).
    fn erf(self) -> Self;
}

impl Float for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
    fn from_usize(v: usize) -> Self {
        v as f32
    }
    fn erf(self) -> Self {
        libm::erff(self)
    }
}

impl Float for f64 {
    fn from_f32(v: f32) -> Self {
        v as f64
    }
    fn from_usize(v: usize) -> Self {
        v as f64
    }
    fn erf(self) -> Self {
        libm::erf(self)
    }
}
