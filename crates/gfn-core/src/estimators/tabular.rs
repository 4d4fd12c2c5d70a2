//! One free row of outputs per state, indexed through the environment's enumeration.

use super::{HeadWidths, Network, Outputs, Wanted};
use crate::env::Environment;
use crate::params::{ParamGroup, ParamId, ParamStore, ParamStoreBuilder, ParamViews};
use crate::{Error, Result};
use tch::Tensor;

pub(crate) struct Table {
    pf: Option<ParamId>,
    pb: Option<ParamId>,
    log_flow: Option<ParamId>,
    heads: HeadWidths,
}

/// State indices as a `[rows]` tensor.
pub(crate) fn input(env: &dyn Environment, states: &[i64]) -> Tensor {
    let enumeration = env.enumeration().expect("checked when the table was built");
    let idx: Vec<i64> = states
        .chunks_exact(env.state_dim())
        .map(|s| enumeration.state_index(s) as i64)
        .collect();
    Tensor::from_slice(&idx)
}

impl Table {
    pub fn new(
        env: &dyn Environment,
        b: &mut ParamStoreBuilder,
        _name: &str,
        heads: HeadWidths,
    ) -> Result<Self> {
        let n = crate::truth::enumerable_states(env).map_err(|e| {
            Error::invalid(
                "model.architecture",
                "tabular",
                format!("needs an environment small enough to enumerate ({e})"),
            )
        })?;
        let mut table = |head: &str, outputs: Option<usize>| {
            outputs.map(|width| {
                b.add(
                    &format!("{head}.table"),
                    &[n as i64, width as i64],
                    ParamGroup::Network,
                    || 0.0,
                )
            })
        };
        Ok(Table {
            pf: table("pf", heads.pf),
            pb: table("pb", heads.pb),
            log_flow: table("log_flow", heads.log_flow.then_some(1)),
            heads,
        })
    }
}

impl Network for Table {
    fn outputs(&self) -> Wanted {
        self.heads.outputs()
    }

    fn forward(&self, p: &ParamViews, input: &Tensor, wanted: Wanted) -> Outputs {
        let rows = |table: Option<ParamId>, asked: bool| {
            table.filter(|_| asked).map(|t| p[t].index_select(0, input))
        };
        Outputs {
            pf_logits: rows(self.pf, wanted.pf),
            pb_logits: rows(self.pb, wanted.pb),
            log_flow: rows(self.log_flow, wanted.log_flow).map(|f| f.squeeze_dim(1)),
        }
    }

    fn pf_logits_host(
        &self,
        params: &ParamStore,
        env: &dyn Environment,
        states: &[i64],
        logits: &mut Vec<f32>,
        _scratch: &mut super::HostScratch,
    ) -> bool {
        let Some(table) = self.pf else {
            return false;
        };
        let table = params.host_values(table).expect("parameters on the CPU");
        let (enumeration, n_actions) = (env.enumeration().expect("a table"), env.n_actions());
        logits.clear();
        for state in states.chunks_exact(env.state_dim()) {
            let i = enumeration.state_index(state);
            logits.extend_from_slice(&table[i * n_actions..(i + 1) * n_actions]);
        }
        true
    }
}
