//! `r2f parity`: the bundled tiny-model parity cases (`tests/fixtures/`) on any device and
//! dtype, against the same references as the CPU tests (diffusers for SD3 and SDXL, the official
//! R2F+ pipeline for the `sd3-r2fplus` cases). Reports, does not judge
//! beyond a stated tolerance: on CUDA in fp32 the final latents are expected within 1e-4
//! relative of the CPU references; fp16 is reported for the record.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::device::{device_name, dtype_name};
use crate::models::hub::ModelFolder;
use crate::pipelines::sd3::plus::{RegionKnobs, RegionRequest};
use crate::pipelines::sd3::Sd3Pipeline;
use crate::pipelines::sdxl::SdxlPipeline;
use crate::pipelines::{Output, Request};
use crate::schedulers::discrete::Scheduler;

/// One case's measured distance to its reference.
#[derive(Debug, Clone, Serialize)]
pub struct ParityCase {
    pub case: String,
    /// `max |got − want| / max |want|` of the final latents.
    pub latents_rel_err: f64,
    /// Fraction of image bytes within 1 of the reference image.
    pub pixels_within_1: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ParityReport {
    pub device: String,
    pub dtype: String,
    pub tolerance: Option<f64>,
    pub cases: Vec<ParityCase>,
    /// Every case within the tolerance (always true without one).
    pub ok: bool,
}

impl fmt::Display for ParityReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "parity on {} in {}", self.device, self.dtype)?;
        for c in &self.cases {
            writeln!(
                f,
                "  {:<34} latents rel err {:.2e}  pixels within 1 {:>7.3}%  ({:.1} s)",
                c.case,
                c.latents_rel_err,
                c.pixels_within_1 * 100.0,
                c.seconds
            )?;
        }
        match self.tolerance {
            Some(t) => write!(
                f,
                "  {} (tolerance {t:.0e} on the latents)",
                if self.ok { "within" } else { "OVER" }
            ),
            None => write!(f, "  (reported, no tolerance)"),
        }
    }
}

/// `max |got − want| / max |want|` in f64 on the CPU: the relative error the parity checks
/// bound (the tests use it too). Infinite when the shapes differ.
pub fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    if got.size() != want.size() {
        return f64::INFINITY;
    }
    let got = got.to_device(Device::Cpu).to_kind(Kind::Double);
    let want = want.to_device(Device::Cpu).to_kind(Kind::Double);
    let scale = want.abs().max().double_value(&[]).max(1e-12);
    (got - &want).abs().max().double_value(&[]) / scale
}

/// The fraction of byte values within 1 of the reference's (the tests use it too); 0 when the
/// lengths differ or there are none.
pub fn fraction_within_one(got: &[u8], want: &[u8]) -> f64 {
    if got.len() != want.len() || got.is_empty() {
        return 0.0;
    }
    let ok = got
        .iter()
        .zip(want)
        .filter(|(a, b)| (**a as i16 - **b as i16).abs() <= 1)
        .count();
    ok as f64 / got.len() as f64
}

fn within_one(got: &Tensor, want: &Tensor) -> f64 {
    let bytes = |t: &Tensor| Vec::<u8>::try_from(t.flatten(0, -1)).unwrap_or_default();
    fraction_within_one(&bytes(got), &bytes(want))
}

struct Reference {
    tensors: std::collections::HashMap<String, Tensor>,
    meta: serde_json::Value,
}

fn reference(fixtures: &Path, name: &str) -> anyhow::Result<Reference> {
    let path = fixtures.join("ref").join(format!("{name}.safetensors"));
    let tensors = Tensor::read_safetensors(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .into_iter()
        .collect();
    let path = fixtures.join("ref").join(format!("{name}.json"));
    let meta = serde_json::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    Ok(Reference { tensors, meta })
}

impl Reference {
    fn request(&self, steps: Option<usize>) -> anyhow::Result<Request> {
        let m = &self.meta;
        let field = |k: &str| {
            m[k].as_f64()
                .with_context(|| format!("reference has no `{k}`"))
        };
        Ok(Request::plain(
            m["prompt"].as_str().context("reference has no prompt")?,
            steps.unwrap_or(field("steps")? as usize),
            field("guidance")?,
            field("seed")? as i64,
            field("width")? as i64,
            field("height")? as i64,
        ))
    }

    fn case(
        &self,
        case: String,
        out: &Output,
        lat: &str,
        img: &str,
        t: f64,
    ) -> anyhow::Result<ParityCase> {
        let get = |k: &str| {
            self.tensors
                .get(k)
                .with_context(|| format!("reference has no tensor `{k}`"))
        };
        Ok(ParityCase {
            case,
            latents_rel_err: rel_err(&out.latents, get(lat)?),
            pixels_within_1: within_one(&out.image, get(img)?),
            seconds: t,
        })
    }
}

/// The R2F+ request of one official reference case (`ref/sd3-r2fplus.json`, `cases[i]`).
pub fn region_request(case: &serde_json::Value) -> anyhow::Result<RegionRequest> {
    let plan: crate::plan::RegionPlan = serde_json::from_value(case["plan"].clone())?;
    plan.validate().map_err(anyhow::Error::msg)?;
    let num = |k: &str| {
        case[k]
            .as_f64()
            .with_context(|| format!("R2F+ case has no `{k}`"))
    };
    let mask = case["region_mask"]
        .as_str()
        .context("R2F+ case has no mask")?;
    Ok(RegionRequest {
        plan,
        negative_prompt: String::new(),
        guidance: num("guidance_scale")?,
        seed: num("seed")? as i64,
        width: num("width")? as i64,
        height: num("height")? as i64,
        steps: num("steps")? as usize,
        knobs: RegionKnobs {
            mask: crate::r2f::regions::RegionMask::parse(mask).map_err(anyhow::Error::msg)?,
            guidance_steps: num("bbox_guidance_steps")? as usize,
            guidance_iterations: num("bbox_guidance_iterations")? as usize,
            loss_scale: num("bbox_loss_scale")?,
            fusion_steps: num("latent_fusion_steps")? as usize,
            schedule: crate::r2f::PromptSchedule::Faithful,
            ..RegionKnobs::default()
        },
    })
}

/// Runs the bundled cases: SD3 `sd3-tiny-a`/`-b` (plain pipeline), SDXL `sdxl-tiny-a`/`-b`
/// (Euler, and 4 DPM-Solver++ 2M Karras steps), and the official R2F+ cases (`sd3-r2fplus`).
pub fn run(
    fixtures: &Path,
    device: Device,
    dtype: Kind,
    tolerance: Option<f64>,
) -> anyhow::Result<ParityReport> {
    let mut cases = Vec::new();
    let timed = |f: &mut dyn FnMut() -> anyhow::Result<Output>| -> anyhow::Result<(Output, f64)> {
        let t0 = std::time::Instant::now();
        let out = f()?;
        Ok((out, t0.elapsed().as_secs_f64()))
    };
    for name in ["sd3-tiny-a", "sd3-tiny-b"] {
        let folder = ModelFolder::open(&fixtures.join(name))?;
        let pipe = Sd3Pipeline::load(&folder, device, dtype)?;
        let r = reference(fixtures, name)?;
        let req = r.request(None)?;
        let (out, t) = timed(&mut || pipe.generate(&req, &mut |_, _| Ok(())))?;
        cases.push(r.case(name.to_string(), &out, "final_latents", "image_u8", t)?);
    }
    for name in ["sdxl-tiny-a", "sdxl-tiny-b"] {
        let folder = ModelFolder::open(&fixtures.join(name))?;
        let pipe = SdxlPipeline::load(&folder, device, dtype)?;
        let r = reference(fixtures, name)?;
        for (label, scheduler, steps, lat, img) in [
            (
                Scheduler::EulerDiscrete.name(),
                Scheduler::EulerDiscrete,
                None,
                "final_latents",
                "image_u8",
            ),
            (
                "dpm++",
                Scheduler::DpmSolverPp2mKarras,
                Some(4),
                "dpm_final_latents",
                "dpm_image_u8",
            ),
        ] {
            let req = r.request(steps)?;
            let (out, t) = timed(&mut || pipe.generate(&req, scheduler, &mut |_, _| Ok(())))?;
            cases.push(r.case(format!("{name} {label}"), &out, lat, img, t)?);
        }
    }
    let r = reference(fixtures, "sd3-r2fplus")?;
    let mut pipes: std::collections::HashMap<String, Sd3Pipeline> = Default::default();
    for case in r.meta["cases"]
        .as_array()
        .context("R2F+ reference has no cases")?
    {
        let name = case["name"].as_str().context("R2F+ case has no name")?;
        let model = case["model"].as_str().context("R2F+ case has no model")?;
        if !pipes.contains_key(model) {
            let folder = ModelFolder::open(&fixtures.join(model))?;
            pipes.insert(
                model.to_string(),
                Sd3Pipeline::load(&folder, device, dtype)?,
            );
        }
        let pipe = pipes.get_mut(model).context("a loaded pipeline")?;
        pipe.t5_tokens = case["max_sequence_length"].as_u64().unwrap_or(256) as usize;
        let req = region_request(case)?;
        let (out, t) = timed(&mut || Ok(pipe.generate_regions(&req, &mut |_, _| Ok(()))?.output))?;
        let (lat, img) = (format!("{name}.final_latents"), format!("{name}.image"));
        cases.push(r.case(format!("r2f+ {name}"), &out, &lat, &img, t)?);
    }
    let ok = tolerance.is_none_or(|tol| cases.iter().all(|c| c.latents_rel_err <= tol));
    Ok(ParityReport {
        device: device_name(device),
        dtype: dtype_name(dtype).to_string(),
        tolerance,
        cases,
        ok,
    })
}

/// The bundled fixtures folder: `tests/fixtures` under the current directory, else under the
/// source tree the binary was built from.
pub fn default_fixtures() -> PathBuf {
    let here = PathBuf::from("tests/fixtures");
    if here.is_dir() {
        here
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }
}
