"""R2F reference runs (docs/method.md §2): ref/sd3-tiny-a-r2f.* and ref/sdxl-tiny-a-r2f.*.

Each run is a hand-written sampling loop over the pipeline's components (no pipeline __call__):
every prompt of the plan is encoded once before the loop, and step i is conditioned on prompt
`mode` on even steps and on the rare (last) prompt on odd steps (R2F_ALT_STEP = 2), where mode
advances by the official ("faithful") rule: while i == T[mode] and T[mode] != 0: mode += 1, with
T = [M[l] for l in levels] + [N] (M: the family's stop-step map, N: the step count).  Before the
R2F run, the same loop with a single-prompt plan is checked against the pipeline's own __call__
(R2F_LOOP_CHECKS / SDXL_R2F_LOOP_CHECKS, relative error <= R2F_LOOP_CHECK_RTOL), and a plain run
of the rare prompt with the R2F run's seed is stored next to it (r2f_plain_final_latents).

  * SD3 (R2F_RUN, on sd3-tiny-a): FlowMatchEulerDiscreteScheduler, negative prompt "", T5 encoded
    at 77 tokens like the official R2F SD3 code; a single prompt gives T = [0] (the SD3 guard).
    The levels are deliberately NOT sorted: T = [M[3], M[1], N] = [20, 5, 50], so mode goes
    0 -> 1 at step 20 and then never reaches 2 (the official quirk); steps 20..49 keep
    alternating p1 (even) / p2 (odd).
  * SDXL (SDXL_R2F_RUN, on sdxl-tiny-a): HEAD stop-step map, DPM++ 2M Karras, zero negatives,
    no length-1 guard.  T = [M[2], M[1], N] = [5, 3, 50], so mode goes 0 -> 1 at step 5 and never
    reaches 2; steps 5..49 alternate p1 (even) / p2 (odd).
"""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from .common import CLIP_MAX_LEN, CPU, T5_MAX_LEN, rel_err, tensor_meta, versions
from .sd3 import CONFIGS, decode_u8, load_sd3_pipeline
from .sdxl import (
    SDXL_CONFIGS, decode_u8_sdxl, dpm_from_pipeline, load_sdxl_pipeline, sdxl_add_time_ids,
    sdxl_dpm,
)

R2F_ALT_STEP = 2
R2F_LOOP_CHECK_RTOL = 1e-6

# --- SD3 ---
R2F_STOP_STEP_MAP = [0, 5, 10, 20, 30, 40]  # SD3: visual detail level -> stop step
R2F_T5_TOKENS = 77  # the official R2F SD3 code encodes T5 with max_sequence_length 77
R2F_RUN = dict(
    config="sd3-tiny-a",
    prompts=[
        "a hairy animal warrior holding a tiny golden object",
        "a hairy frog warrior holding a tiny golden object",
        "A hairy frog warrior holding a tiny golden sword",
    ],
    levels=[3, 1],
    steps=50, guidance=7.0, seed=1234, width=64, height=48,
)
# Plain-pipeline settings the hand loop is checked against (StableDiffusion3Pipeline.__call__).
R2F_LOOP_CHECKS = [
    dict(seed=42, steps=4, max_sequence_length=T5_MAX_LEN),  # = the sd3-tiny-a pipeline reference
    dict(seed=42, steps=28, max_sequence_length=T5_MAX_LEN),
]

# --- SDXL ---
SDXL_R2F_STOP_STEP_MAP = [0, 3, 5, 10, 20, 30]
SDXL_R2F_RUN = dict(
    config="sdxl-tiny-a",
    prompts=[
        "a furry animal warrior holding a golden object",
        "a furry frog warrior holding a golden object",
        "a furry frog warrior holding a golden sword",
    ],
    levels=[2, 1],
    steps=50, guidance=5.0, seed=2024, width=64, height=48,
)
# single-prompt plans the hand loop is checked against StableDiffusionXLPipeline.__call__ with
SDXL_R2F_LOOP_CHECKS = [
    dict(seed=5, steps=4),      # = the sdxl-tiny-a dpm_final_latents reference
    dict(seed=2024, steps=50),  # = r2f_plain_final_latents
]

PLAN_NOTE_TAIL = (
    "r2f_plain_final_latents: the same loop with the single prompt [prompt]; "
    "plain_vs_r2f_rel_diff = max|r2f_final - plain_final| / max|plain_final|")
SD3_NOTE = (
    "r2f_final_latents: hand-written R2F loop (pipe.encode_prompt per prompt with "
    "negative prompt \"\" and T5 max_sequence_length t5_tokens, batch [uncond, cond], "
    "CFG, FlowMatchEulerDiscreteScheduler.step); r2f_init_latents = "
    "torch.manual_seed(seed); torch.randn((1,16,H/f,W/f)) on CPU; " + PLAN_NOTE_TAIL)
SDXL_NOTE = (
    "r2f_final_latents: hand-written R2F loop (pipe.encode_prompt per prompt, 77 CLIP "
    "tokens, negative_prompt=None -> zero negatives; batch [uncond, cond]; "
    "DPMSolverMultistepScheduler.from_config(euler_config, use_karras_sigmas=True); "
    "latents * init_noise_sigma; scale_model_input; CFG; step); r2f_init_latents = "
    "torch.manual_seed(seed); torch.randn((1,4,H/f,W/f)) on CPU; " + PLAN_NOTE_TAIL)


# --------------------------------------------------------------------------------------------
# Schedule.
# --------------------------------------------------------------------------------------------
def r2f_transitions(levels, n_prompts, steps):
    """T = [M[l] for l in levels] + [N]; SD3 guard: a single prompt gives T = [0]."""
    if n_prompts == 1:
        return [0]
    return [R2F_STOP_STEP_MAP[int(l)] for l in levels] + [steps]


def sdxl_r2f_transitions(levels, steps):
    """T = [M[l] for l in levels] + [N]; SDXL has NO length-1 guard."""
    return [SDXL_R2F_STOP_STEP_MAP[int(l)] for l in levels] + [steps]


def r2f_step_prompts(transitions, n_prompts, steps):
    """Index of the prompt conditioning each step, with the official (faithful) advance rule."""
    rare = n_prompts - 1
    mode, used = 0, []
    for i in range(steps):
        while i == transitions[mode] and transitions[mode] != 0:
            mode += 1
        used.append(mode if i % R2F_ALT_STEP == 0 else rare)
    return used


def cfg_guidance(noise_pred, guidance):
    uncond, cond = noise_pred.chunk(2)
    return uncond + guidance * (cond - uncond)


def r2f_tensors(init, final, img_u8, plain):
    return {
        "r2f_init_latents": init.contiguous(),
        "r2f_final_latents": final.contiguous(),
        "r2f_image_u8": torch.from_numpy(img_u8).to(torch.uint8).contiguous(),
        "r2f_plain_final_latents": plain.contiguous(),
    }


def common_meta(run, used, transitions, plain_vs_r2f, checks, tensors):
    """The meta entries SD3 and SDXL R2F references share."""
    return {
        "model": run["config"],
        "plan": {
            "visual_detail_level": [str(l) for l in run["levels"]],
            "r2f_prompt": [list(run["prompts"])],
        },
        "prompt": run["prompts"][-1],
        "steps": run["steps"],
        "guidance": run["guidance"],
        "seed": run["seed"],
        "width": run["width"],
        "height": run["height"],
        "schedule": "faithful",
        "alt_step": R2F_ALT_STEP,
        "transition_steps": transitions,
        "r2f_step_prompt": used,
        "plain_vs_r2f_rel_diff": plain_vs_r2f,
        "hand_loop_checks": checks,
        "tensors": tensor_meta(tensors),
        "versions": versions(),
    }


# --------------------------------------------------------------------------------------------
# SD3.
# --------------------------------------------------------------------------------------------
def encode_sd3_prompts(pipe, prompts, max_sequence_length):
    """Every prompt encoded once, before the loop; CFG batch order [negative "", prompt]."""
    embeds = []
    for p in prompts:
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=p, prompt_2=p, prompt_3=p, device=CPU, num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt="", negative_prompt_2="", negative_prompt_3="",
            max_sequence_length=max_sequence_length,
        )
        embeds.append((torch.cat([npe, pe], dim=0), torch.cat([nppe, ppe], dim=0)))
    return embeds


@torch.no_grad()
def r2f_loop(pipe, model_dir, prompts, levels, init, steps, guidance, max_sequence_length):
    """One R2F SD3 sampling run, written out by hand (no pipeline __call__)."""
    embeds = encode_sd3_prompts(pipe, prompts, max_sequence_length)
    transitions = r2f_transitions(levels, len(prompts), steps)
    plan = r2f_step_prompts(transitions, len(prompts), steps)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")
    scheduler.set_timesteps(steps, device=CPU)
    assert len(scheduler.timesteps) == steps
    latents = init.clone()
    rare = len(prompts) - 1
    mode, used = 0, []
    for i, t in enumerate(scheduler.timesteps):
        while i == transitions[mode] and transitions[mode] != 0:
            mode += 1
        idx = mode if i % R2F_ALT_STEP == 0 else rare
        used.append(idx)
        prompt_embeds, pooled = embeds[idx]
        latent_in = torch.cat([latents] * 2)
        noise_pred = pipe.transformer(
            hidden_states=latent_in, timestep=t.expand(latent_in.shape[0]),
            encoder_hidden_states=prompt_embeds, pooled_projections=pooled, return_dict=False,
        )[0]
        latents = scheduler.step(cfg_guidance(noise_pred, guidance), t, latents,
                                 return_dict=False)[0]
    assert used == plan, (used, plan)
    return latents, used, transitions


def sd3_hand_loop_check(pipe, model_dir, chk, cfg_run, plain_ref):
    """The hand loop (single-prompt plan: no switching) == diffusers' own loop."""
    rare, vsf = cfg_run["prompt"], pipe.vae_scale_factor
    torch.manual_seed(chk["seed"])
    init = torch.randn((1, 16, cfg_run["height"] // vsf, cfg_run["width"] // vsf),
                       dtype=torch.float32)
    mine, used, transitions = r2f_loop(
        pipe, model_dir, [rare], [], init, chk["steps"], cfg_run["guidance"],
        chk["max_sequence_length"])
    assert transitions == [0] and used == [0] * chk["steps"]
    ref = pipe(rare, latents=init.clone(), output_type="latent", negative_prompt="",
               height=cfg_run["height"], width=cfg_run["width"],
               num_inference_steps=chk["steps"], guidance_scale=cfg_run["guidance"],
               max_sequence_length=chk["max_sequence_length"]).images
    err = rel_err(mine, ref)
    entry = dict(chk, guidance=cfg_run["guidance"], prompt=rare, rel_err_vs_pipeline=err)
    if chk["seed"] == cfg_run["seed"] and chk["steps"] == cfg_run["steps"]:
        # the very settings of the stored plain reference: also against its final_latents
        assert torch.equal(init, plain_ref["init_latents"])
        entry["rel_err_vs_stored_final_latents"] = rel_err(mine, plain_ref["final_latents"])
        assert entry["rel_err_vs_stored_final_latents"] <= R2F_LOOP_CHECK_RTOL, entry
    assert err <= R2F_LOOP_CHECK_RTOL, entry
    return entry


def check_t5_77_embeddings(pipe, rare, plain_ref):
    """The R2F encodings use T5 length 77: the rare prompt's embedding must be the stored
    [CLIP (77) ; T5-77 (77)] pieces of the plain reference."""
    pe77 = pipe.encode_prompt(prompt=rare, prompt_2=rare, prompt_3=rare, device=CPU,
                              num_images_per_prompt=1, do_classifier_free_guidance=True,
                              negative_prompt="", max_sequence_length=R2F_T5_TOKENS)[0]
    assert pe77.shape == (1, CLIP_MAX_LEN + R2F_T5_TOKENS, 32), pe77.shape
    assert torch.equal(pe77[:, CLIP_MAX_LEN:], plain_ref["t5_hidden_77"][1:])
    assert torch.equal(pe77[:, :CLIP_MAX_LEN], plain_ref["prompt_embeds"][:, :CLIP_MAX_LEN])


@torch.no_grad()
def compute_r2f_reference(model_dir, plain_ref):
    """ref/sd3-tiny-a-r2f: returns (tensors, meta)."""
    run = R2F_RUN
    cfg_run = CONFIGS[run["config"]]["run"]
    pipe = load_sd3_pipeline(model_dir)
    vsf = pipe.vae_scale_factor
    prompts, rare = run["prompts"], run["prompts"][-1]
    assert rare == cfg_run["prompt"] and run["width"] == cfg_run["width"]
    assert run["height"] == cfg_run["height"] and run["guidance"] == cfg_run["guidance"]
    # 1) the hand loop against the pipeline
    checks = [sd3_hand_loop_check(pipe, model_dir, chk, cfg_run, plain_ref)
              for chk in R2F_LOOP_CHECKS]
    check_t5_77_embeddings(pipe, rare, plain_ref)
    # 2) the R2F run
    torch.manual_seed(run["seed"])
    init = torch.randn((1, 16, run["height"] // vsf, run["width"] // vsf), dtype=torch.float32)
    final, used, transitions = r2f_loop(
        pipe, model_dir, prompts, run["levels"], init, run["steps"], run["guidance"],
        R2F_T5_TOKENS)
    img_u8 = decode_u8(pipe, final)
    assert img_u8.shape == (run["height"], run["width"], 3)
    # 3) a plain run of the rare prompt with the same seed / steps / T5 length
    plain, plain_used, _ = r2f_loop(
        pipe, model_dir, [rare], [], init, run["steps"], run["guidance"], R2F_T5_TOKENS)
    assert plain_used == [0] * run["steps"]
    plain_vs_r2f = rel_err(final, plain)
    assert plain_vs_r2f > 1e-3, plain_vs_r2f  # R2F must actually change the result

    tensors = r2f_tensors(init, final, img_u8, plain)
    meta = common_meta(run, used, transitions, plain_vs_r2f, checks, tensors)
    meta.update(negative_prompt="", t5_tokens=R2F_T5_TOKENS, stop_step_map=R2F_STOP_STEP_MAP,
                note=SD3_NOTE)
    return tensors, meta


# --------------------------------------------------------------------------------------------
# SDXL.
# --------------------------------------------------------------------------------------------
def encode_sdxl_prompts(pipe, prompts):
    """Every prompt encoded once, before the loop; CFG order [uncond (zeros), cond]."""
    embeds = []
    for p in prompts:
        pe, npe, ppe, nppe = pipe.encode_prompt(
            p, device=CPU, num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=None)
        assert not npe.any() and not nppe.any()
        embeds.append((torch.cat([npe, pe], dim=0), torch.cat([nppe, ppe], dim=0)))
    return embeds


@torch.no_grad()
def sdxl_r2f_loop(pipe, model_dir, prompts, levels, init, steps, guidance, height, width):
    """One R2F SDXL sampling run, written out by hand with the pipeline's components."""
    embeds = encode_sdxl_prompts(pipe, prompts)
    add_time_ids = sdxl_add_time_ids(pipe, height, width)
    add_time_ids = torch.cat([add_time_ids, add_time_ids], dim=0)
    transitions = sdxl_r2f_transitions(levels, steps)
    scheduler = sdxl_dpm(model_dir)
    scheduler.set_timesteps(steps, device=CPU)
    scheduler.set_begin_index(0)
    assert len(scheduler.timesteps) == steps
    latents = init.clone() * scheduler.init_noise_sigma
    rare = len(prompts) - 1
    mode, used = 0, []
    for i, t in enumerate(scheduler.timesteps):
        while i == transitions[mode] and transitions[mode] != 0:
            mode += 1
        idx = mode if i % R2F_ALT_STEP == 0 else rare
        used.append(idx)
        prompt_embeds, pooled = embeds[idx]
        latent_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_pred = pipe.unet(
            latent_in, t, encoder_hidden_states=prompt_embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": add_time_ids},
            return_dict=False,
        )[0]
        latents = scheduler.step(cfg_guidance(noise_pred, guidance), t, latents,
                                 return_dict=False)[0]
    return latents, used, transitions


def sdxl_hand_loop_check(pipe, model_dir, chk, run, cfg_run, plain_ref):
    """The hand loop with a single-prompt plan == StableDiffusionXLPipeline.__call__ (with DPM++
    2M Karras swapped in).  Returns (meta entry, the hand loop's final latents)."""
    H, W, rare, vsf = run["height"], run["width"], run["prompts"][-1], pipe.vae_scale_factor
    torch.manual_seed(chk["seed"])
    init = torch.randn((1, 4, H // vsf, W // vsf), dtype=torch.float32)
    mine, used, transitions = sdxl_r2f_loop(
        pipe, model_dir, [rare], [], init, chk["steps"], run["guidance"], H, W)
    assert transitions == [chk["steps"]] and used == [0] * chk["steps"]
    ref = pipe(rare, latents=init.clone(), output_type="latent", height=H, width=W,
               num_inference_steps=chk["steps"], guidance_scale=run["guidance"]).images
    err = rel_err(mine, ref)
    entry = dict(chk, guidance=run["guidance"], prompt=rare, rel_err_vs_pipeline=err)
    if chk["seed"] == cfg_run["seed"] and chk["steps"] == cfg_run["dpm_steps"]:
        assert torch.equal(init, plain_ref["init_latents"])
        entry["rel_err_vs_stored_dpm_final_latents"] = rel_err(mine, plain_ref["dpm_final_latents"])
        assert entry["rel_err_vs_stored_dpm_final_latents"] <= R2F_LOOP_CHECK_RTOL, entry
    assert err <= R2F_LOOP_CHECK_RTOL, entry
    return entry, mine


def sdxl_hand_loop_checks(pipe, model_dir, run, cfg_run, plain_ref):
    """All SDXL_R2F_LOOP_CHECKS; returns (entries, {(seed, steps): final latents})."""
    euler_sched = pipe.scheduler
    pipe.scheduler = dpm_from_pipeline(pipe)
    checks, plain_by_seed = [], {}
    for chk in SDXL_R2F_LOOP_CHECKS:
        entry, mine = sdxl_hand_loop_check(pipe, model_dir, chk, run, cfg_run, plain_ref)
        checks.append(entry)
        plain_by_seed[(chk["seed"], chk["steps"])] = mine
    pipe.scheduler = euler_sched
    return checks, plain_by_seed


@torch.no_grad()
def compute_sdxl_r2f_reference(model_dir, plain_ref):
    """ref/sdxl-tiny-a-r2f: returns (tensors, meta)."""
    run = SDXL_R2F_RUN
    cfg_run = SDXL_CONFIGS[run["config"]]["run"]
    pipe = load_sdxl_pipeline(model_dir)
    vsf = pipe.vae_scale_factor
    H, W = run["height"], run["width"]
    prompts, rare = run["prompts"], run["prompts"][-1]
    assert rare == cfg_run["prompt"] and (W, H) == (cfg_run["width"], cfg_run["height"])
    assert run["guidance"] == cfg_run["guidance"]
    # 1) the hand loop against the pipeline
    checks, plain_by_seed = sdxl_hand_loop_checks(pipe, model_dir, run, cfg_run, plain_ref)
    # 2) the R2F run
    torch.manual_seed(run["seed"])
    init = torch.randn((1, 4, H // vsf, W // vsf), dtype=torch.float32)
    final, used, transitions = sdxl_r2f_loop(
        pipe, model_dir, prompts, run["levels"], init, run["steps"], run["guidance"], H, W)
    assert transitions == [5, 3, 50], transitions
    img_u8 = decode_u8_sdxl(pipe, final)
    assert img_u8.shape == (H, W, 3)
    # 3) plain run of the rare prompt, same seed / steps (checked against __call__ above)
    plain, plain_used, _ = sdxl_r2f_loop(
        pipe, model_dir, [rare], [], init, run["steps"], run["guidance"], H, W)
    assert plain_used == [0] * run["steps"]
    assert torch.equal(plain, plain_by_seed[(run["seed"], run["steps"])])
    plain_vs_r2f = rel_err(final, plain)
    assert plain_vs_r2f > 1e-3, plain_vs_r2f

    tensors = r2f_tensors(init, final, img_u8, plain)
    meta = common_meta(run, used, transitions, plain_vs_r2f, checks, tensors)
    meta.update(
        negative_prompt=None,
        negative="zeros (force_zeros_for_empty_prompt=True, no negative prompt), sequence and pooled",
        add_time_ids=[H, W, 0, 0, H, W], scheduler="dpmsolver++-2m-karras",
        stop_step_map=SDXL_R2F_STOP_STEP_MAP, note=SDXL_NOTE)
    return tensors, meta
