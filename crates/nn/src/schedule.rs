/// How the learning rate falls after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decay {
    /// Half a cosine from the base rate down to the minimum at the last step.
    Cosine,
    /// A straight line from the base rate down to the minimum at the last step.
    Linear,
    /// The base rate throughout.
    Constant,
}

/// Linear warm-up over `warmup_steps`, then `decay` until `total_steps`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub base_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: Decay,
}

impl LrSchedule {
    /// The rate for 0-based `step`. Warm-up reaches the base rate on step
    /// `warmup_steps - 1` (never a zero rate on the first step).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let range = self.base_lr - self.min_lr;
        match self.decay {
            Decay::Constant => self.base_lr,
            Decay::Linear => self.base_lr - range * progress,
            Decay::Cosine => self.min_lr + 0.5 * range * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(decay: Decay) -> LrSchedule {
        LrSchedule { base_lr: 1.0, min_lr: 0.1, warmup_steps: 4, total_steps: 14, decay }
    }

    #[test]
    fn warmup_is_linear_and_never_zero() {
        let s = sched(Decay::Cosine);
        assert_eq!(s.lr(0), 0.25);
        assert_eq!(s.lr(3), 1.0);
    }

    #[test]
    fn decays_reach_min_at_the_end() {
        let c = sched(Decay::Cosine);
        assert!((c.lr(4) - 1.0).abs() < 1e-12);
        assert!((c.lr(9) - 0.55).abs() < 1e-12, "halfway is the midpoint");
        assert!((c.lr(14) - 0.1).abs() < 1e-12);
        assert!((c.lr(100) - 0.1).abs() < 1e-12, "stays at min past the end");
        let l = sched(Decay::Linear);
        assert!((l.lr(9) - 0.55).abs() < 1e-12);
        assert!((l.lr(14) - 0.1).abs() < 1e-12);
        assert_eq!(sched(Decay::Constant).lr(13), 1.0);
        // Monotone after warm-up.
        for d in [Decay::Cosine, Decay::Linear] {
            let s = sched(d);
            for step in 4..20 {
                assert!(s.lr(step + 1) <= s.lr(step));
            }
        }
    }
}
