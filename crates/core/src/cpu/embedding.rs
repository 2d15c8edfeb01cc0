//! Token + position embedding: out[b, t] = wte[tokens[b, t]] + wpe[t].

use rayon::prelude::*;

use crate::Float;

/// tokens (B*T) with every id already checked < rows of wte; out (B*T, C).
pub(crate) fn forward<F: Float>(out: &mut [F], tokens: &[u32], wte: &[F], wpe: &[F], t: usize, c: usize) {
    out.par_chunks_mut(c).zip(tokens.par_iter()).enumerate().with_min_len(super::ROWS_PER_TASK).for_each(
        |(row, (o, &tok))| {
            let pos = row % t;
            let we = &wte[tok as usize * c..][..c];
            let pe = &wpe[pos * c..][..c];
            for i in 0..c {
                o[i] = we[i] + pe[i];
            }
        },
    );
}

/// dwte[tok] += dout[row]; dwpe[pos] += dout[row]. Serial in row order: a token
/// repeated in the batch adds its gradients in a fixed order (deterministic).
pub(crate) fn backward<F: Float>(dwte: &mut [F], dwpe: &mut [F], dout: &[F], tokens: &[u32], t: usize, c: usize) {
    for (row, &tok) in tokens.iter().enumerate() {
        let g = &dout[row * c..][..c];
        let dwe = &mut dwte[tok as usize * c..][..c];
        for i in 0..c {
            dwe[i] += g[i];
        }
        let dpe = &mut dwpe[(row % t) * c..][..c];
        for i in 0..c {
            dpe[i] += g[i];
        }
    }
}
