//! SDXL's schedulers against diffusers 0.42.1 (references from `scripts/make_fixtures.py`):
//! Euler discrete and DPM-Solver++ 2M Karras timesteps and sigmas for 1, 2, 30 and 50 steps,
//! Euler's init_noise_sigma, and five DPM-Solver++ steps on fixed model outputs (rel. err
//! <= 1e-5: the scalar coefficients use libm's log/exp, not libtorch's kernels).
//!
//! Timesteps are compared exactly: both sides make them integers (the "leading" spacing is
//! integer arithmetic, the Karras timesteps are rounded to the nearest integer), so they do not
//! depend on the machine. Sigmas and init_noise_sigma are compared within `SIGMA_ULPS`: diffusers
//! computes them with `pow`, `log`, `exp` and libtorch's vectorised float32 kernels, whose last
//! bit differs between machines (diffusers 0.42.1 itself gives 0.029167535 on one x86-64 machine
//! and 0.029167533 on another for the same sigma), and so does r2f, which calls the system libm.

mod common;

use common::*;
use r2f::schedulers::discrete::{DiscreteConfig, DiscreteSchedule, Sampler, Scheduler};

const CONFIGS: [&str; 2] = ["sdxl-tiny-a", "sdxl-tiny-b"];

/// Bound on the distance between r2f's and diffusers' schedule floats: one ulp for each side's
/// machine-dependent last bit.
const SIGMA_ULPS: u64 = 2;

fn config(name: &str) -> DiscreteConfig {
    DiscreteConfig::load(&model_dir(name).join("scheduler")).unwrap()
}

#[test]
fn euler_and_dpm_schedules_match_diffusers() {
    for name in CONFIGS {
        let r = reference(name);
        let cfg = config(name);
        for n in [1usize, 2, 30, 50] {
            let e = DiscreteSchedule::new(&cfg, Scheduler::EulerDiscrete, n).unwrap();
            let want_t = Vec::<f32>::try_from(&r[&format!("euler_timesteps_{n}")]).unwrap();
            let want_s = Vec::<f32>::try_from(&r[&format!("euler_sigmas_{n}")]).unwrap();
            assert_eq!(e.timesteps, want_t, "{name} Euler timesteps, {n} steps");
            assert_within_ulps(
                &format!("{name} Euler sigmas, {n} steps"),
                &e.sigmas,
                &want_s,
                SIGMA_ULPS,
            );
            let want_init = r[&format!("euler_init_noise_sigma_{n}")].double_value(&[]) as f32;
            assert_within_ulps(
                &format!("{name} init_noise_sigma, {n} steps"),
                &[e.init_noise_sigma],
                &[want_init],
                SIGMA_ULPS,
            );

            let d = DiscreteSchedule::new(&cfg, Scheduler::DpmSolverPp2mKarras, n).unwrap();
            let want_t: Vec<f32> = Vec::<i64>::try_from(&r[&format!("dpm_timesteps_{n}")])
                .unwrap()
                .into_iter()
                .map(|t| t as f32)
                .collect();
            let want_s = Vec::<f32>::try_from(&r[&format!("dpm_sigmas_{n}")]).unwrap();
            assert_eq!(d.timesteps, want_t, "{name} DPM++ timesteps, {n} steps");
            assert_within_ulps(
                &format!("{name} DPM++ sigmas, {n} steps"),
                &d.sigmas,
                &want_s,
                SIGMA_ULPS,
            );
        }
    }
}

/// The same sigma as diffusers 0.42.1 computes it on another x86-64 machine (AMD EPYC, AVX2),
/// one ulp away from the stored reference: r2f must agree with both.
#[test]
fn dpm_sigmas_match_a_reference_recomputed_on_another_machine() {
    let d =
        DiscreteSchedule::new(&config("sdxl-tiny-a"), Scheduler::DpmSolverPp2mKarras, 2).unwrap();
    let elsewhere = 0.029_167_534_78_f64 as f32;
    let stored = Vec::<f32>::try_from(&reference("sdxl-tiny-a")["dpm_sigmas_2"]).unwrap()[1];
    assert_eq!(
        ulps(elsewhere, stored),
        1,
        "the two references are one ulp apart"
    );
    for want in [elsewhere, stored] {
        assert_within_ulps(
            "sdxl-tiny-a DPM++ sigma 1 of 2",
            &d.sigmas[1..2],
            &[want],
            SIGMA_ULPS,
        );
    }
}

#[test]
fn ulp_distance_counts_neighbouring_floats() {
    assert_eq!(ulps(1.0, 1.0), 0);
    assert_eq!(ulps(0.0, -0.0), 0);
    assert_eq!(ulps(1.0, f32::from_bits(1.0f32.to_bits() + 1)), 1);
    assert_eq!(ulps(f32::from_bits(1), -f32::from_bits(1)), 2);
    assert_eq!(ulps(0.029_167_535, 0.029_167_533), 1);
}

#[test]
fn dpm_solver_steps_match_diffusers_on_fixed_model_outputs() {
    for name in CONFIGS {
        let r = reference(name);
        let cfg = config(name);
        let outputs = &r["dpm_step_model_outputs"];
        let want = &r["dpm_step_samples"];
        let n = outputs.size()[0] as usize;
        let schedule = DiscreteSchedule::new(&cfg, Scheduler::DpmSolverPp2mKarras, n).unwrap();
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
