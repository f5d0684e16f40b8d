//! SDXL's schedulers against diffusers 0.42.1 (references from `scripts/make_fixtures.py`):
//! Euler discrete and DPM-Solver++ 2M Karras timesteps and sigmas for 1, 2, 30 and 50 steps
//! (bit-identical), Euler's init_noise_sigma, and five DPM-Solver++ steps on fixed model outputs
//! (rel. err <= 1e-5: the scalar coefficients use libm's log/exp, not libtorch's kernels).

mod common;

use common::*;
use r2f::schedulers::discrete::{DiscreteConfig, DiscreteSchedule, Sampler, SamplerKind};

const CONFIGS: [&str; 2] = ["sdxl-tiny-a", "sdxl-tiny-b"];

fn config(name: &str) -> DiscreteConfig {
    DiscreteConfig::load(&model_dir(name).join("scheduler")).unwrap()
}

#[test]
fn euler_and_dpm_schedules_are_bit_identical() {
    for name in CONFIGS {
        let r = reference(name);
        let cfg = config(name);
        for n in [1usize, 2, 30, 50] {
            let e = DiscreteSchedule::new(&cfg, SamplerKind::EulerDiscrete, n).unwrap();
            let want_t = Vec::<f32>::try_from(&r[&format!("euler_timesteps_{n}")]).unwrap();
            let want_s = Vec::<f32>::try_from(&r[&format!("euler_sigmas_{n}")]).unwrap();
            assert_eq!(e.timesteps, want_t, "{name} Euler timesteps, {n} steps");
            assert_eq!(e.sigmas, want_s, "{name} Euler sigmas, {n} steps");
            let want_init = r[&format!("euler_init_noise_sigma_{n}")].double_value(&[]) as f32;
            assert_eq!(
                e.init_noise_sigma, want_init,
                "{name} init_noise_sigma, {n} steps"
            );

            let d = DiscreteSchedule::new(&cfg, SamplerKind::DpmSolverPp2mKarras, n).unwrap();
            let want_t: Vec<f32> = Vec::<i64>::try_from(&r[&format!("dpm_timesteps_{n}")])
                .unwrap()
                .into_iter()
                .map(|t| t as f32)
                .collect();
            let want_s = Vec::<f32>::try_from(&r[&format!("dpm_sigmas_{n}")]).unwrap();
            assert_eq!(d.timesteps, want_t, "{name} DPM++ timesteps, {n} steps");
            assert_eq!(d.sigmas, want_s, "{name} DPM++ sigmas, {n} steps");
        }
    }
}

#[test]
fn dpm_solver_steps_match_diffusers_on_fixed_model_outputs() {
    for name in CONFIGS {
        let r = reference(name);
        let cfg = config(name);
        let outputs = &r["dpm_step_model_outputs"];
        let want = &r["dpm_step_samples"];
        let n = outputs.size()[0] as usize;
        let schedule = DiscreteSchedule::new(&cfg, SamplerKind::DpmSolverPp2mKarras, n).unwrap();
        let mut sampler = Sampler::new(schedule);
        let mut x = r["dpm_step_sample0"].shallow_clone();
        for i in 0..n {
            x = sampler.step(&outputs.get(i as i64), i, &x);
            assert_close(
                &format!("{name} DPM++ step {i}"),
                &x,
                &want.get(i as i64),
                1e-5,
            );
        }
    }
}
