//! All trainable parameters share one flat storage tensor: every parameter is a leaf tensor that
//! views its slice. The optimizer updates the flat tensor in a few ops, a checkpoint is one
//! tensor, and the gradient is gathered into one contiguous buffer for a single all-reduce.
//! (Leaves that *view* the storage, rather than views taken from one flat leaf inside the
//! graph, keep backward from materialising a full-size gradient per parameter.)

use rand::Rng;
use tch::{Device, Kind, Tensor};

/// Optimizer groups: network weights and log Z have their own learning rates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamGroup {
    Network,
    LogZ,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamId(usize);

#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: String,
    pub offset: usize,
    pub shape: Vec<i64>,
    pub group: ParamGroup,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product::<i64>() as usize
    }
}

/// Collects parameter shapes and initial values before the flat tensor exists.
#[derive(Default)]
pub struct ParamStoreBuilder {
    specs: Vec<ParamSpec>,
    values: Vec<f32>,
}

impl ParamStoreBuilder {
    /// Adds a parameter filled with `init`.
    pub fn add(
        &mut self,
        name: &str,
        shape: &[i64],
        group: ParamGroup,
        init: impl FnMut() -> f32,
    ) -> ParamId {
        let spec = ParamSpec {
            name: name.to_string(),
            offset: self.values.len(),
            shape: shape.to_vec(),
            group,
        };
        self.values
            .extend(std::iter::repeat_with(init).take(spec.numel()));
        self.specs.push(spec);
        ParamId(self.specs.len() - 1)
    }

    /// Adds a parameter drawn from U(-bound, bound).
    pub fn add_uniform(
        &mut self,
        name: &str,
        shape: &[i64],
        bound: f32,
        rng: &mut impl Rng,
    ) -> ParamId {
        self.add(name, shape, ParamGroup::Network, || {
            rng.gen_range(-bound..=bound)
        })
    }

    pub fn build(self, device: Device) -> ParamStore {
        let flat = Tensor::from_slice(&self.values).to_device(device);
        let leaves = self
            .specs
            .iter()
            .map(|s| {
                flat.narrow(0, s.offset as i64, s.numel() as i64)
                    .view(s.shape.as_slice())
                    .detach()
                    .set_requires_grad(true)
            })
            .collect();
        ParamStore {
            flat,
            leaves,
            specs: self.specs,
            device,
        }
    }
}

pub struct ParamStore {
    /// Storage of every parameter; no autograd of its own.
    flat: Tensor,
    /// One autograd leaf per parameter, viewing its slice of `flat`.
    leaves: Vec<Tensor>,
    specs: Vec<ParamSpec>,
    device: Device,
}

impl ParamStore {
    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }
    pub fn device(&self) -> Device {
        self.device
    }
    pub fn len(&self) -> usize {
        self.specs.last().map_or(0, |s| s.offset + s.numel())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The flat tensor that stores every parameter (update it only under `no_grad`).
    pub fn flat(&self) -> &Tensor {
        &self.flat
    }

    /// The values of one parameter as a host slice, when the parameters live on the CPU; for
    /// reading in plain Rust (the rollout policy) without a tensor op.
    pub fn host_values(&self, id: ParamId) -> Option<&[f32]> {
        if self.device != Device::Cpu {
            return None;
        }
        let spec = &self.specs[id.0];
        // SAFETY: `flat` is a contiguous f32 CPU tensor of `self.len()` elements, and
        // `spec.offset + spec.numel() <= self.len()`. Its values change only in the optimizer
        // step, a restore or a broadcast, none of which runs while the returned borrow of
        // `self` is alive.
        Some(unsafe {
            std::slice::from_raw_parts(
                (self.flat.data_ptr() as *const f32).add(spec.offset),
                spec.numel(),
            )
        })
    }

    /// The parameters as autograd leaves.
    pub fn views(&self) -> ParamViews {
        ParamViews(self.leaves.iter().map(|t| t.shallow_clone()).collect())
    }

    /// The accumulated gradient gathered into one flat tensor (zeros where none accumulated).
    pub fn grad(&self) -> Tensor {
        let grads: Vec<Tensor> = self
            .leaves
            .iter()
            .map(|leaf| {
                let g = leaf.grad();
                if g.defined() {
                    g.view([-1])
                } else {
                    leaf.detach().zeros_like().view([-1])
                }
            })
            .collect();
        Tensor::cat(&grads, 0)
    }

    pub fn zero_grad(&mut self) {
        for leaf in &mut self.leaves {
            leaf.zero_grad();
        }
    }

    /// A per-element tensor built from a per-group value (learning rates, weight decay).
    pub fn per_group(&self, value: impl Fn(ParamGroup) -> f64) -> Tensor {
        let mut out = vec![0f32; self.len()];
        for spec in &self.specs {
            out[spec.offset..spec.offset + spec.numel()].fill(value(spec.group) as f32);
        }
        Tensor::from_slice(&out).to_device(self.device)
    }

    /// Overwrites every parameter (checkpoint restore, broadcast from rank 0).
    pub fn copy_from(&mut self, values: &Tensor) {
        tch::no_grad(|| {
            self.flat
                .copy_(&values.to_kind(Kind::Float).to_device(self.device))
        });
    }

    pub fn to_vec(&self) -> Vec<f32> {
        Vec::<f32>::try_from(self.flat.detach().to_device(Device::Cpu))
            .expect("flat parameters are f32")
    }
}

/// Parameter tensors indexed by [`ParamId`].
pub struct ParamViews(Vec<Tensor>);

impl std::ops::Index<ParamId> for ParamViews {
    type Output = Tensor;
    fn index(&self, id: ParamId) -> &Tensor {
        &self.0[id.0]
    }
}
