//! Adam, owned by the host. Plugins hand over their parameters; keeping the moment buffers here (rather
//! than inside libtorch's optimizer object) lets checkpoints hold the full optimizer state.
use anyhow::{bail, Result};
use tch::Tensor;

pub struct Adam {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: i64,
    parameters: Vec<(String, Tensor)>,
    first_moment: Vec<Tensor>,
    second_moment: Vec<Tensor>,
}

impl Adam {
    /// PyTorch's defaults: betas (0.9, 0.999), eps 1e-8.
    pub fn new(parameters: Vec<(String, Tensor)>, lr: f64, weight_decay: f64) -> Self {
        let first_moment = parameters.iter().map(|(_, p)| p.zeros_like()).collect();
        let second_moment = parameters.iter().map(|(_, p)| p.zeros_like()).collect();
        Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            step: 0,
            parameters,
            first_moment,
            second_moment,
        }
    }

    pub fn zero_grad(&mut self) {
        for (_, parameter) in &mut self.parameters {
            parameter.zero_grad();
        }
    }

    /// One update, as `torch.optim.Adam` does it (L2 weight decay added to the gradient).
    pub fn step(&mut self) {
        self.step += 1;
        let bias1 = 1.0 - self.beta1.powi(self.step as i32);
        let bias2 = 1.0 - self.beta2.powi(self.step as i32);
        tch::no_grad(|| {
            for (((_, parameter), m), v) in self
                .parameters
                .iter_mut()
                .zip(&mut self.first_moment)
                .zip(&mut self.second_moment)
            {
                let mut gradient = parameter.grad();
                if !gradient.defined() {
                    continue;
                }
                if self.weight_decay != 0.0 {
                    gradient += &*parameter * self.weight_decay;
                }
                let _ = m
                    .g_mul_scalar_(self.beta1)
                    .g_add_(&(&gradient * (1.0 - self.beta1)));
                let _ = v
                    .g_mul_scalar_(self.beta2)
                    .g_add_(&(&gradient * &gradient * (1.0 - self.beta2)));
                let denominator = v.sqrt() / bias2.sqrt() + self.eps;
                let update = &*m / denominator * (self.lr / bias1);
                let _ = parameter.g_sub_(&update);
            }
        });
    }

    /// Moment buffers by parameter name, for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut state = Vec::with_capacity(self.parameters.len() * 2);
        for (((name, _), m), v) in self
            .parameters
            .iter()
            .zip(&self.first_moment)
            .zip(&self.second_moment)
        {
            state.push((format!("adam.m.{name}"), m.shallow_clone()));
            state.push((format!("adam.v.{name}"), v.shallow_clone()));
        }
        state
    }

    pub fn load_state(&mut self, state: &[(String, Tensor)], step: i64) -> Result<()> {
        let lookup: std::collections::HashMap<&str, &Tensor> =
            state.iter().map(|(n, t)| (n.as_str(), t)).collect();
        tch::no_grad(|| {
            for (((name, _), m), v) in self
                .parameters
                .iter()
                .zip(&mut self.first_moment)
                .zip(&mut self.second_moment)
            {
                for (prefix, buffer) in [("adam.m.", m), ("adam.v.", v)] {
                    let Some(saved) = lookup.get(format!("{prefix}{name}").as_str()) else {
                        bail!("optimizer state has no `{prefix}{name}`");
                    };
                    buffer.f_copy_(saved)?;
                }
            }
            Ok(())
        })?;
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn first_adam_step_moves_each_weight_by_lr_against_its_gradient_sign() {
        // With zero moments, the first bias-corrected step is lr * g / (|g| + eps) ~= lr * sign(g).
        let w = Tensor::from_slice(&[1.0f32, -2.0, 3.0]).set_requires_grad(true);
        let mut adam = Adam::new(vec![("w".into(), w.shallow_clone())], 0.1, 0.0);
        let loss = (&w * Tensor::from_slice(&[2.0f32, -1.0, 0.5])).sum(Kind::Float);
        adam.zero_grad();
        loss.backward();
        adam.step();
        let expected = Tensor::from_slice(&[0.9f32, -1.9, 2.9]);
        assert!((w.detach() - expected).abs().max().double_value(&[]) < 1e-5);
        assert_eq!(adam.state().len(), 2);
        let _ = Device::Cpu;
    }
}
