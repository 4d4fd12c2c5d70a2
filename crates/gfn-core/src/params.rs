//! All trainable parameters live in one flat leaf tensor. Modules see them as views, so the
//! gradient is one contiguous buffer: a single all-reduce in DDP, one optimizer update, one
//! tensor to checkpoint.

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
    pub fn add(&mut self, name: &str, shape: &[i64], group: ParamGroup, init: impl FnMut() -> f32) -> ParamId {
        let spec = ParamSpec { name: name.to_string(), offset: self.values.len(), shape: shape.to_vec(), group };
        self.values.extend(std::iter::repeat_with(init).take(spec.numel()));
        self.specs.push(spec);
        ParamId(self.specs.len() - 1)
    }

    /// Adds a parameter drawn from U(-bound, bound).
    pub fn add_uniform(&mut self, name: &str, shape: &[i64], bound: f32, rng: &mut impl Rng) -> ParamId {
        self.add(name, shape, ParamGroup::Network, || rng.gen_range(-bound..=bound))
    }

    pub fn build(self, device: Device) -> ParamStore {
        let flat = Tensor::from_slice(&self.values).to_device(device).set_requires_grad(true);
        ParamStore { flat, specs: self.specs, device }
    }
}

pub struct ParamStore {
    flat: Tensor,
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

    /// The flat leaf tensor that owns every parameter.
    pub fn flat(&self) -> &Tensor {
        &self.flat
    }

    /// Views that autograd traces back to the flat tensor (for the loss).
    pub fn views(&self) -> ParamViews {
        ParamViews(self.specs.iter().map(|s| self.view_of(&self.flat, s)).collect())
    }

    /// Views that share storage but record no graph (for sampling and evaluation).
    pub fn detached_views(&self) -> ParamViews {
        let detached = self.flat.detach();
        ParamViews(self.specs.iter().map(|s| self.view_of(&detached, s)).collect())
    }

    fn view_of(&self, base: &Tensor, spec: &ParamSpec) -> Tensor {
        base.narrow(0, spec.offset as i64, spec.numel() as i64).view(spec.shape.as_slice())
    }

    /// The accumulated gradient as one flat tensor (zeros before the first backward).
    pub fn grad(&self) -> Tensor {
        let grad = self.flat.grad();
        if grad.defined() {
            grad
        } else {
            self.flat.zeros_like()
        }
    }

    pub fn zero_grad(&mut self) {
        self.flat.zero_grad();
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
        tch::no_grad(|| self.flat.copy_(&values.to_kind(Kind::Float).to_device(self.device)));
    }

    pub fn to_vec(&self) -> Vec<f32> {
        Vec::<f32>::try_from(self.flat.detach().to_device(Device::Cpu)).expect("flat parameters are f32")
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
