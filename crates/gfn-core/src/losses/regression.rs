//! How a balance residual t becomes a loss g(t) (torchgfn's `loss_fn`; Hu et al., "Beyond
//! Squared Error", ICLR 2025): every g has g(0) = 0, g ≥ 0 and g'(0) = 0, and each induces its
//! own f-divergence between the learned and the target distribution.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// Exponents are clamped here so that e^t stays finite in f32.
const EXP_CLAMP: f64 = 80.0;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Regression {
    /// t² (reverse KL; mode-seeking). The default.
    #[default]
    Squared,
    /// t²/2, so that g'(t) = t (RTB's convention).
    HalfSquared,
    /// e^t + e^−t − 2: symmetric, both zero-forcing and zero-avoiding.
    ShiftedCosh,
    /// (e^{αt} − αt − 1)/α² with α = `loss.linex_alpha` (α = 1: forward KL, zero-avoiding).
    Linex,
}

impl Regression {
    pub const NAMES: &'static str = "squared, half_squared, shifted_cosh, linex";

    pub fn validate(&self, linex_alpha: f64) -> Result<()> {
        if *self == Regression::Linex && !(linex_alpha != 0.0 && linex_alpha.is_finite()) {
            return Err(Error::invalid(
                "loss.linex_alpha",
                linex_alpha,
                "must be a non-zero number (α = 0 is half_squared)",
            ));
        }
        Ok(())
    }

    /// g(t) elementwise.
    pub fn apply(&self, t: &Tensor, linex_alpha: f64) -> Tensor {
        match self {
            Regression::Squared => t.square(),
            Regression::HalfSquared => t.square() * 0.5,
            Regression::ShiftedCosh => {
                let t = t.clamp(-EXP_CLAMP, EXP_CLAMP);
                t.exp() + (-&t).exp() - 2.0
            }
            Regression::Linex => {
                let a = linex_alpha;
                let at = (t * a).clamp(-EXP_CLAMP, EXP_CLAMP);
                (at.exp() - &at - 1.0) / (a * a)
            }
        }
    }

    /// g(t) for one number, in f64: the reference the tensor version is tested against.
    pub fn of(&self, t: f64, linex_alpha: f64) -> f64 {
        match self {
            Regression::Squared => t * t,
            Regression::HalfSquared => 0.5 * t * t,
            Regression::ShiftedCosh => {
                let t = t.clamp(-EXP_CLAMP, EXP_CLAMP);
                t.exp() + (-t).exp() - 2.0
            }
            Regression::Linex => {
                let at = (linex_alpha * t).clamp(-EXP_CLAMP, EXP_CLAMP);
                (at.exp() - at - 1.0) / (linex_alpha * linex_alpha)
            }
        }
    }
}

/// The regression a loss applies to its residuals.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Residuals {
    pub regression: Regression,
    pub linex_alpha: f64,
}

impl Residuals {
    pub fn loss(&self, residual: &Tensor) -> Tensor {
        self.regression.apply(residual, self.linex_alpha)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    const ALL: [Regression; 4] = [
        Regression::Squared,
        Regression::HalfSquared,
        Regression::ShiftedCosh,
        Regression::Linex,
    ];

    #[test]
    fn each_loss_is_its_formula_zero_and_flat_at_zero() {
        let points = [-10.0, -2.0, -0.5, 0.0, 0.5, 2.0, 10.0];
        let hand = |r: Regression, t: f64, a: f64| match r {
            Regression::Squared => t * t,
            Regression::HalfSquared => t * t / 2.0,
            Regression::ShiftedCosh => 2.0 * (t.cosh() - 1.0),
            Regression::Linex => ((a * t).exp() - a * t - 1.0) / (a * a),
        };
        for r in ALL {
            for a in [1.0, 0.5, -0.7] {
                let t = Tensor::from_slice(&points).to_kind(Kind::Double);
                let values = Vec::<f64>::try_from(r.apply(&t, a)).unwrap();
                for (&x, &v) in points.iter().zip(&values) {
                    let expected = hand(r, x, a);
                    assert!(
                        (v - expected).abs() <= 1e-9 * expected.abs().max(1.0),
                        "{r:?} g({x}) = {v}, not {expected}"
                    );
                    assert!((r.of(x, a) - expected).abs() <= 1e-9 * expected.abs().max(1.0));
                    assert!(v >= 0.0, "{r:?} g({x}) = {v}");
                }
                // g'(t) by central differences against autograd, and g'(0) = 0.
                for &x in &points {
                    let t = Tensor::from_slice(&[x])
                        .to_kind(Kind::Double)
                        .set_requires_grad(true);
                    r.apply(&t, a).sum(Kind::Double).backward();
                    let grad = t.grad().double_value(&[0]);
                    let h = 1e-6;
                    let numeric = (r.of(x + h, a) - r.of(x - h, a)) / (2.0 * h);
                    assert!(
                        (grad - numeric).abs() <= 1e-5 * numeric.abs().max(1.0),
                        "{r:?} g'({x}) = {grad}, not {numeric}"
                    );
                    if x == 0.0 {
                        assert_eq!(grad, 0.0, "{r:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn extreme_residuals_stay_finite_and_alpha_zero_is_refused() {
        let t = Tensor::from_slice(&[-1e4f32, -100.0, 100.0, 1e4]);
        for r in ALL {
            let values = Vec::<f32>::try_from(r.apply(&t, 1.0)).unwrap();
            assert!(values.iter().all(|v| v.is_finite()), "{r:?}: {values:?}");
        }
        let err = Regression::Linex.validate(0.0).unwrap_err().to_string();
        assert!(err.starts_with("invalid loss.linex_alpha = 0"), "{err}");
        assert!(Regression::ShiftedCosh.validate(0.0).is_ok());
    }
}
