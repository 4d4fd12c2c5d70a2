//! All trainable parameters share one flat storage tensor: every parameter is a leaf tensor that
//! views its slice. The optimizer updates the flat tensor in a few ops, a checkpoint is one
//! tensor, and the leaves' gradients view one flat gradient buffer, which backward fills in
//! place and a single all-reduce takes as it is. (Leaves that *view* the storage, rather than
//! views taken from one flat leaf inside the graph, keep backward from materialising a
//! full-size gradient per parameter.)

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
    /// Elements (saturating, so that an absurd shape is sized, not wrapped).
    pub fn numel(&self) -> usize {
        self.shape
            .iter()
            .fold(1usize, |n, &d| n.saturating_mul(d.max(0) as usize))
    }
}

/// Collects parameter shapes and initial values before the flat tensor exists.
#[derive(Default)]
pub struct ParamStoreBuilder {
    specs: Vec<ParamSpec>,
    values: Vec<f32>,
    numel: usize,
    /// Shapes only: no values drawn or stored (to size a model before allocating it).
    counting: bool,
}

impl ParamStoreBuilder {
    /// A builder that records shapes and counts elements but holds no values.
    pub fn counting() -> Self {
        ParamStoreBuilder {
            counting: true,
            ..Default::default()
        }
    }

    /// Elements added so far (saturating).
    pub fn numel(&self) -> usize {
        self.numel
    }

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
            offset: self.numel,
            shape: shape.to_vec(),
            group,
        };
        let n = spec.numel();
        self.numel = self.numel.saturating_add(n);
        if !self.counting {
            self.values.extend(std::iter::repeat_with(init).take(n));
        }
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

    /// Adds a parameter drawn from N(0, 1) (Box–Muller, in f64).
    pub fn add_normal(&mut self, name: &str, shape: &[i64], rng: &mut impl Rng) -> ParamId {
        self.add(name, shape, ParamGroup::Network, || {
            standard_normal(rng) as f32
        })
    }

    pub fn build(self, device: Device) -> ParamStore {
        assert!(
            !self.counting,
            "a counting builder holds no values to build from"
        );
        let flat = Tensor::from_slice(&self.values).to_device(device);
        let leaves = leaves_over(&flat, &self.specs);
        ParamStore {
            flat,
            leaf_sets: vec![leaves],
            specs: self.specs,
            device,
        }
    }
}

/// One autograd leaf per parameter, each viewing its slice of `flat`, with its gradient
/// viewing the same slice of a flat gradient buffer (returned too): backward accumulates into
/// the buffer, which is zeroed in one op and read with no gathering.
fn leaves_over(flat: &Tensor, specs: &[ParamSpec]) -> LeafSet {
    let slice = |t: &Tensor, s: &ParamSpec| {
        t.narrow(0, s.offset as i64, s.numel() as i64)
            .view(s.shape.as_slice())
    };
    let leaves: Vec<Tensor> = specs
        .iter()
        .map(|s| slice(flat, s).detach().set_requires_grad(true))
        .collect();
    let grad = flat.detach().zeros_like();
    // A backward pass gives every leaf a gradient tensor, which then takes the buffer's slice
    // as its data (tch cannot assign a leaf's gradient directly).
    tch::with_grad(|| {
        let touch = leaves
            .iter()
            .map(|l| l.sum(Kind::Float) * 0.0)
            .reduce(|a, b| a + b);
        if let Some(touch) = touch {
            touch.backward();
        }
    });
    for (leaf, s) in leaves.iter().zip(specs) {
        leaf.grad().set_data(&slice(&grad, s));
    }
    LeafSet { leaves, grad }
}

struct LeafSet {
    leaves: Vec<Tensor>,
    /// The flat gradient that the leaves' gradients view.
    grad: Tensor,
}

pub struct ParamStore {
    /// Storage of every parameter; no autograd of its own.
    flat: Tensor,
    /// Sets of autograd leaves over `flat`, one leaf per parameter. Set 0 is the one used by
    /// default; threads that run backward passes over the same parameters at once each take
    /// their own set, so that each accumulates into gradients that only it writes.
    leaf_sets: Vec<LeafSet>,
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

    pub fn spec(&self, id: ParamId) -> &ParamSpec {
        &self.specs[id.0]
    }

    /// One parameter's values, copied.
    pub fn value(&self, id: ParamId) -> Tensor {
        self.slice(id).copy()
    }

    /// Overwrites one parameter with `values` (its shape flattened).
    pub fn set(&mut self, id: ParamId, values: &Tensor) {
        tch::no_grad(|| self.slice(id).copy_(values));
    }

    /// Adds `delta` (host values, the parameter's shape flattened) to one parameter.
    pub fn add_to(&mut self, id: ParamId, delta: &[f32]) {
        let delta = Tensor::from_slice(delta).to_device(self.device);
        tch::no_grad(|| {
            let _ = self.slice(id).g_add_(&delta);
        });
    }

    fn slice(&self, id: ParamId) -> Tensor {
        let spec = &self.specs[id.0];
        self.flat.narrow(0, spec.offset as i64, spec.numel() as i64)
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
        self.views_of(0)
    }

    /// Leaf set `set` (see [`ParamStore::ensure_leaf_sets`]).
    pub fn views_of(&self, set: usize) -> ParamViews {
        ParamViews(
            self.leaf_sets[set]
                .leaves
                .iter()
                .map(|t| t.shallow_clone())
                .collect(),
        )
    }

    /// Makes sure that `n` sets of leaves exist.
    pub fn ensure_leaf_sets(&mut self, n: usize) {
        while self.leaf_sets.len() < n {
            self.leaf_sets.push(leaves_over(&self.flat, &self.specs));
        }
    }

    /// The gradient accumulated in every leaf set, summed in set order, as one flat tensor.
    /// With a single set this is the live buffer itself (no copy): the next backward pass or
    /// [`ParamStore::zero_grad`] changes it.
    pub fn grad(&self) -> Tensor {
        let mut sets = self.leaf_sets.iter();
        let first = sets
            .next()
            .expect("leaf set 0 always exists")
            .grad
            .shallow_clone();
        sets.fold(first, |sum, set| sum + &set.grad)
    }

    pub fn zero_grad(&mut self) {
        for set in &mut self.leaf_sets {
            let _ = set.grad.zero_();
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

/// One draw of N(0, 1) (Box–Muller).
pub fn standard_normal(rng: &mut impl Rng) -> f64 {
    let (u, v): (f64, f64) = (1.0 - rng.gen::<f64>(), rng.gen());
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// Parameter tensors indexed by [`ParamId`].
pub struct ParamViews(Vec<Tensor>);

impl std::ops::Index<ParamId> for ParamViews {
    type Output = Tensor;
    fn index(&self, id: ParamId) -> &Tensor {
        &self.0[id.0]
    }
}

/// Whether every element of a float tensor is finite.
pub fn all_finite(t: &Tensor) -> bool {
    all_below(t, f32::INFINITY)
}

/// Whether every element of a float tensor has a magnitude below `limit` (NaN never has): a
/// loop over CPU memory, one reduction elsewhere. It runs on every update (gradient and
/// parameters), so each chunk is folded without an early exit, which the compiler vectorises.
pub fn all_below(t: &Tensor, limit: f32) -> bool {
    const CHUNK: usize = 4096;
    if t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous() {
        // SAFETY: a contiguous f32 CPU tensor of `numel` elements, borrowed for the loop.
        let values = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, t.numel()) };
        return values
            .chunks(CHUNK)
            .all(|chunk| chunk.iter().fold(true, |ok, x| ok & (x.abs() < limit)));
    }
    t.numel() == 0 || t.abs().max().double_value(&[]) < limit as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two parameters, w = [1, 2] and b = [3], and the loss Σ c·w + d·b² on leaf set `set`.
    fn backward_on(params: &ParamStore, set: usize, c: [f32; 2], d: f32) {
        let p = params.views_of(set);
        let loss = (&p[ParamId(0)] * Tensor::from_slice(&c)).sum(Kind::Float)
            + (&p[ParamId(1)] * &p[ParamId(1)]).sum(Kind::Float) * d as f64;
        loss.backward();
    }

    #[test]
    fn all_below_finds_one_bad_element_anywhere_in_either_path() {
        let mut values = vec![0.5f32; 10_000];
        let host = |v: &[f32]| Tensor::from_slice(v);
        assert!(all_below(&host(&values), 1.0));
        for (at, bad) in [
            (0, f32::NAN),
            (4096, 1.0),
            (9_999, f32::NEG_INFINITY),
            (5_000, -2.0),
        ] {
            values[at] = bad;
            assert!(!all_below(&host(&values), 1.0), "{bad} at {at}");
            // A strided view takes the tensor-op path.
            let strided = host(&values).view([100, 100]).transpose(0, 1);
            assert!(!all_below(&strided, 1.0), "{bad} at {at}, strided");
            values[at] = 0.5;
        }
        assert!(all_finite(&host(&[f32::MAX, -f32::MAX])));
        assert!(!all_finite(&host(&[0.0, f32::INFINITY])));
    }

    #[test]
    fn backward_fills_the_flat_gradient_of_every_leaf_set() {
        let mut b = ParamStoreBuilder::default();
        let mut w = [1.0f32, 2.0].into_iter();
        b.add("w", &[2], ParamGroup::Network, || w.next().unwrap());
        b.add("b", &[1], ParamGroup::Network, || 3.0);
        let mut params = b.build(Device::Cpu);
        let read = |params: &ParamStore| Vec::<f32>::try_from(params.grad()).unwrap();
        assert_eq!(read(&params), [0.0, 0.0, 0.0], "fresh gradients are zero");

        backward_on(&params, 0, [0.5, -1.0], 1.0);
        assert_eq!(read(&params), [0.5, -1.0, 6.0]);
        backward_on(&params, 0, [1.0, 1.0], 0.0);
        assert_eq!(read(&params), [1.5, 0.0, 6.0], "backward passes accumulate");

        params.ensure_leaf_sets(2);
        backward_on(&params, 1, [2.0, 4.0], 0.5);
        assert_eq!(read(&params), [3.5, 4.0, 9.0], "the sets' gradients add up");

        params.zero_grad();
        assert_eq!(read(&params), [0.0, 0.0, 0.0]);
        backward_on(&params, 1, [1.0, 0.0], 0.0);
        assert_eq!(read(&params), [1.0, 0.0, 0.0], "every set was zeroed");
    }
}
