//! The model stage: a two-layer perceptron (input → hidden, ReLU → classes, softmax) held by
//! each worker, run on whole batches with one matrix multiply per layer (ndarray).

use ndarray::{Array1, Array2, ArrayView1, Axis};
use stateful_pool::{BatchTask, BoxError, TaskContext, Worker, WorkerContext};

/// The model's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Input features.
    pub inputs: usize,
    /// Hidden units.
    pub hidden: usize,
    /// Output classes.
    pub classes: usize,
}

/// The model a worker loads once in its spawn step (weights from a seed, so every worker and
/// the direct baseline hold the same model, as if loaded from one file).
#[derive(Debug)]
pub struct Mlp {
    w1: Array2<f32>,
    b1: Array1<f32>,
    w2: Array2<f32>,
    b2: Array1<f32>,
}

/// A deterministic pseudo-random weight in `[-scale, scale)` (xorshift).
fn weight(state: &mut u64, scale: f32) -> f32 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    ((*state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
}

impl Mlp {
    /// The model of `shape` with weights drawn from `seed`.
    pub fn new(shape: Shape, seed: u64) -> Mlp {
        let mut s = seed | 1;
        let s1 = (1.0 / shape.inputs as f32).sqrt();
        let s2 = (1.0 / shape.hidden as f32).sqrt();
        Mlp {
            w1: Array2::from_shape_simple_fn((shape.inputs, shape.hidden), || weight(&mut s, s1)),
            b1: Array1::from_shape_simple_fn(shape.hidden, || weight(&mut s, 0.1)),
            w2: Array2::from_shape_simple_fn((shape.hidden, shape.classes), || weight(&mut s, s2)),
            b2: Array1::from_shape_simple_fn(shape.classes, || weight(&mut s, 0.1)),
        }
    }

    /// Input features the model takes.
    pub fn inputs(&self) -> usize {
        self.w1.nrows()
    }

    /// Class probabilities of a batch: `x` is `batch × inputs`, the result `batch × classes`,
    /// each row summing to 1.
    pub fn forward(&self, x: &Array2<f32>) -> Array2<f32> {
        let mut h = x.dot(&self.w1) + &self.b1;
        h.mapv_inplace(|v| v.max(0.0));
        let mut y = h.dot(&self.w2) + &self.b2;
        for mut row in y.axis_iter_mut(Axis(0)) {
            let max = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            row.mapv_inplace(|v| (v - max).exp());
            let sum = row.sum();
            row.mapv_inplace(|v| v / sum);
        }
        y
    }

    /// Class probabilities of one input.
    pub fn predict(&self, x: ArrayView1<'_, f32>) -> Result<Vec<f32>, String> {
        self.check(x.len())?;
        Ok(self
            .forward(&x.insert_axis(Axis(0)).to_owned())
            .row(0)
            .to_vec())
    }

    fn check(&self, len: usize) -> Result<(), String> {
        if len != self.inputs() {
            return Err(format!(
                "the model takes {} features, not {len}",
                self.inputs()
            ));
        }
        Ok(())
    }
}

impl Worker for Mlp {
    /// The seed and the shape (inputs, hidden, classes).
    type SpawnArgs = (u64, u32, u32, u32);
    type SpawnOutput = ();
    /// The input features.
    type Task = Vec<f32>;
    /// The class probabilities.
    type Output = Vec<f32>;

    fn spawn(
        (seed, inputs, hidden, classes): (u64, u32, u32, u32),
        _: &WorkerContext,
    ) -> Result<(Self, ()), BoxError> {
        let shape = Shape {
            inputs: inputs as usize,
            hidden: hidden as usize,
            classes: classes as usize,
        };
        Ok((Mlp::new(shape, seed), ()))
    }

    fn execute(
        &mut self,
        x: &rkyv::Archived<Vec<f32>>,
        _: &TaskContext<'_>,
    ) -> Result<Vec<f32>, BoxError> {
        let x: Array1<f32> = x.iter().map(|v| v.to_native()).collect();
        Ok(self.predict(x.view())?)
    }

    fn execute_batch(
        &mut self,
        batch: &[BatchTask<'_, Vec<f32>>],
    ) -> Result<Vec<Result<Vec<f32>, BoxError>>, BoxError> {
        // Stack the inputs (one of the wrong size fails alone), one forward pass for all.
        let mut x = Array2::<f32>::zeros((batch.len(), self.inputs()));
        let mut bad = vec![None; batch.len()];
        for (i, t) in batch.iter().enumerate() {
            match self.check(t.task.len()) {
                Ok(()) => {
                    for (dst, v) in x.row_mut(i).iter_mut().zip(t.task.iter()) {
                        *dst = v.to_native();
                    }
                }
                Err(e) => bad[i] = Some(e),
            }
        }
        let y = self.forward(&x);
        Ok(bad
            .into_iter()
            .enumerate()
            .map(|(i, bad)| match bad {
                None => Ok(y.row(i).to_vec()),
                Some(e) => Err(e.into()),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_gives_each_row_what_it_gives_alone() {
        let shape = Shape {
            inputs: 12,
            hidden: 8,
            classes: 3,
        };
        let m = Mlp::new(shape, 7);
        let mut s = 99u64;
        let x = Array2::from_shape_simple_fn((5, 12), || weight(&mut s, 1.0));
        let y = m.forward(&x);
        for i in 0..5 {
            let alone = m.predict(x.row(i)).unwrap();
            let sum: f32 = alone.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5);
            for (a, b) in alone.iter().zip(y.row(i)) {
                assert!((a - b).abs() < 1e-5);
            }
        }
        assert!(m.predict(x.row(0).slice(ndarray::s![..3])).is_err());
    }
}
