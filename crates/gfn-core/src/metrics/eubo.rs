//! The EUBO, E_{x~R/Z, τ~P_B(·|x)}[log P_B(τ|x) + log R(x) − log P_F(τ)], an upper bound on
//! log Z (gfnx's EUBO), where the target can be sampled exactly: enumerable environments.
//! Relative to a prior, R(x) is the tilted target p_prior(x)·R(x)^β.

use super::{EvalContext, Metric, Values};
use crate::env::Environment;
use crate::losses::trajectory_log_probs;
use crate::sampler::backward_rollout;
use crate::Result;
use rand::Rng;

/// Terminal states rolled back and scored together.
const CHUNK: usize = 256;

pub struct Eubo {
    samples: usize,
}

impl Eubo {
    pub fn new(samples: usize) -> Self {
        Eubo { samples }
    }
}

/// `n` state indices drawn from `probabilities` (inverse CDF).
fn draw(probabilities: &[f64], n: usize, rng: &mut impl Rng) -> Vec<usize> {
    let mut cdf = Vec::with_capacity(probabilities.len());
    let mut total = 0.0;
    for &p in probabilities {
        total += p;
        cdf.push(total);
    }
    let last = probabilities.iter().rposition(|&p| p > 0.0).unwrap_or(0);
    (0..n)
        .map(|_| {
            let u = rng.gen::<f64>() * total;
            cdf.partition_point(|&c| c <= u).min(last)
        })
        .collect()
}

impl Metric for Eubo {
    fn name(&self) -> &'static str {
        "eubo"
    }

    fn compute(&mut self, ctx: &mut EvalContext) -> Result<Values> {
        let truth = ctx.truth.expect("built only where the truth is known");
        let env: &dyn Environment = ctx.env;
        let enumeration = env.enumeration().expect("a truth implies enumeration");
        let d = env.state_dim();
        let drawn = draw(&truth.probabilities, self.samples, &mut ctx.rng);
        let mut total = 0.0;
        let mut state = vec![0i64; d];
        for chunk in drawn.chunks(CHUNK) {
            let mut states = Vec::with_capacity(chunk.len() * d);
            for &i in chunk {
                enumeration.state_from_index(i, &mut state);
                states.extend_from_slice(&state);
            }
            let batch = backward_rollout(env, ctx.estimators, &states, &mut ctx.rng)?;
            let (log_pf, log_pb) = trajectory_log_probs(env, ctx.estimators, &batch);
            // The target's own log-weight: log R(x), or with a prior log p_prior(x) + β log R(x).
            for (b, &i) in chunk.iter().enumerate() {
                total += log_pb[b] + truth.log_target[i] - log_pf[b];
            }
        }
        Ok(vec![("eubo".into(), total / self.samples as f64)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn draws_follow_the_probabilities() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let drawn = draw(&[0.0, 0.25, 0.0, 0.75, 0.0], 40_000, &mut rng);
        let threes = drawn.iter().filter(|&&i| i == 3).count() as f64 / 40_000.0;
        assert!(drawn.iter().all(|&i| i == 1 || i == 3));
        assert!((threes - 0.75).abs() < 0.01, "{threes}");
    }
}
