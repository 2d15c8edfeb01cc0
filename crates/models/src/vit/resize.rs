//! Resizing the position table's grid when a ViT is fine-tuned at another
//! resolution than it was trained at: bicubic interpolation exactly as
//! PyTorch's `F.interpolate(mode="bicubic", align_corners=False)` computes it,
//! which transformers' `interpolate_pos_encoding` and timm's
//! `resample_abs_pos_embed` use, so an imported model sees the positions it
//! would see there.

/// PyTorch's cubic convolution constant.
const A: f64 = -0.75;

/// The four weights of the samples at offsets -1, 0, 1, 2 from the floor, at fraction `t`.
fn weights(t: f64) -> [f64; 4] {
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// For each output index: the four source indices (clamped to the edge) and their weights.
fn taps(input: usize, output: usize) -> Vec<([usize; 4], [f64; 4])> {
    let scale = input as f64 / output as f64;
    (0..output)
        .map(|o| {
            // align_corners = False, and no clamp at 0 for cubic (PyTorch's area_pixel_compute_source_index).
            let real = scale * (o as f64 + 0.5) - 0.5;
            let floor = real.floor();
            let idx = |k: i64| (floor as i64 - 1 + k).clamp(0, input as i64 - 1) as usize;
            ([idx(0), idx(1), idx(2), idx(3)], weights(real - floor))
        })
        .collect()
}

/// `grid` (h, w, c) row-major resized to (nh, nw, c).
pub fn resize_bicubic(grid: &[f64], (h, w, c): (usize, usize, usize), (nh, nw): (usize, usize)) -> Vec<f64> {
    let (ty, tx) = (taps(h, nh), taps(w, nw));
    let mut out = vec![0.0; nh * nw * c];
    for (oy, (ys, wy)) in ty.iter().enumerate() {
        for (ox, (xs, wx)) in tx.iter().enumerate() {
            let o = &mut out[(oy * nw + ox) * c..][..c];
            for (&y, &a) in ys.iter().zip(wy) {
                for (&x, &b) in xs.iter().zip(wx) {
                    let src = &grid[(y * w + x) * c..][..c];
                    for (o, &v) in o.iter_mut().zip(src) {
                        *o += a * b * v;
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_pytorch_bicubic() {
        // F.interpolate(x.view(1, 1, 3, 3), size=(4, 5), mode="bicubic", align_corners=False), float64.
        let x = [1.0, 2.0, 4.0, 3.0, 5.0, 0.0, 2.0, -1.0, 1.0];
        let want = [
            0.7673359374999996,
            1.0364199218749974,
            1.78466796875,
            3.382994140624998,
            4.527343750000001,
            2.179019531249998,
            3.4722324218749985,
            4.578125,
            2.7488222656250008,
            1.01987109375,
            2.829796874999998,
            3.212673828124999,
            3.16748046875,
            1.2027558593750016,
            -0.3907734375000003,
            2.2506757812499996,
            0.4447988281249994,
            -1.4306640625,
            -0.14100976562500023,
            1.3120117187500002,
        ];
        let got = resize_bicubic(&x, (3, 3, 1), (4, 5));
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
    }

    #[test]
    fn the_same_size_is_the_identity_and_channels_stay_apart() {
        let x: Vec<f64> = (0..4 * 3 * 2).map(|i| (i * 7 % 11) as f64).collect();
        let same = resize_bicubic(&x, (4, 3, 2), (4, 3));
        assert!(same.iter().zip(&x).all(|(a, b)| (a - b).abs() < 1e-12));
        // Channel 1 constant: stays constant at any size (the weights sum to 1).
        let mut y = x.clone();
        y.iter_mut().skip(1).step_by(2).for_each(|v| *v = 3.5);
        let big = resize_bicubic(&y, (4, 3, 2), (7, 9));
        assert!(big.iter().skip(1).step_by(2).all(|v| (v - 3.5).abs() < 1e-12));
    }
}
