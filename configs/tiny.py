"""CPU preset (the default): small from-scratch priors, low resolution, a few hundred steps.

Every prior is a tiny latent-diffusion model (``tsjax.diffusion.sampling.tiny_model``) trained from
scratch on the renders it is given, so no pretrained weights are needed. Renders are 64 px, the
tetrahedral grid is 32^3 and stage 2 runs 300 steps; the contextual loss uses the concept prior's
VAE-encoder features unless ``--vgg`` is given. Intended to finish in minutes on 2 CPU cores.

Because the priors learn everything from these renders, their training and use are kept consistent:
each prior sees the empty prompt 10% of the time (``prompt_dropout``: classifier-free guidance needs an
unconditional prediction, which a pretrained Stable Diffusion has and a from-scratch model does not), and
stage 2 prompts them with their training prompts (``guidance.view_prompts=False``: no ", front view"
suffixes they never saw; the camera condition tells them the view).

The reference prior of ``tiny`` is a colour prior only (no normal renders, no normal-map distillation) and
learns from the same perspective framing as stage 2 (``camera_mode="paper"``): behind the random frozen text
encoder a from-scratch prior cannot tell "..., normal map" from the colour prompt (measured: its samples
for the two prompts are the same pictures), so training it on both made it, and the shared VSD LoRA, a
blend of colour and normal maps that tinted the albedo (reduced e2e run, palette distance to the
exemplars 9.7 with normal maps vs 5.9 without; lower is closer). The ``paper`` preset keeps the paper's
normal-map distillation.

Stage 2 queries the reference prior without classifier-free guidance (``reference_guidance_scale=1``;
the concept prior keeps CFG 3): the reference prior's conditional and unconditional predictions are
learnt from the same exemplar renders (the unconditional one through prompt dropout), so ``c - u`` is
not a direction toward the theme but noise, and CFG amplifies it into colour noise on the albedo
(reduced e2e run, palette distance to the exemplars, lower is closer: reference CFG 3 6.35 / 7.12 on
stage-2 seeds 0 / 1 vs 6.15 / 5.65 with CFG 1). Whether the reference prior keeps the result closer to
the exemplars' palette than the concept prior alone is NOT settled at this size: the difference is
within the spread over stage-2 seeds and changes sign with numerically equivalent kernels, and on the
full preset DSD ended slightly further from the palette than the concept prior alone on 3 of 4 stage-2
seeds (means 7.41 vs 7.11; numbers in tests/theme/test_e2e_tiny.py).

Two departures from the paper's numbers, both because the priors are tiny:
- framing: renders use fovy 45 deg (paper cameras: 75; stage 2: 40-50 instead of 70-80) at the same
  distances, so the object spans ~75% of the 64 px frame (~12 of the 16 latent pixels) instead of ~40%;
  at 75 deg a house is a 6-latent-pixel blob to a 16x16-latent prior.
- geometry learning rates 2e-3 / 2e-4 (hash-grid encoding / SDF MLP): with 1e-2 / 1e-3 the blurry
  guidance of from-scratch priors erodes the initial model into a lump within 100 steps (roof and
  chimney gone); at the lower rates the massing survives and stage 2 mostly repaints and reshapes it.
"""
import dataclasses

from tsjax.config import (CameraConfig, ConceptPriorConfig, Config, GeometryConfig, GuidanceConfig, InitConfig,
                          OptimConfig, PriorTrainConfig, ReferencePriorConfig, RenderConfig, ThemePriorConfig)


def get_config() -> Config:
    tiny_train = PriorTrainConfig(model="tiny", steps=300, lr=1e-3, batch_size=8, resolution=64, vae_steps=200,
                                  camera=True, camera_dropout=0.1, prompt_dropout=0.1)
    return Config(
        name="tiny",
        theme_prior=ThemePriorConfig(train=tiny_train, n_views=16, steps_single=300, steps_group=300,
                                     n_concepts=4, sample_steps=20, guidance_scale=3.0, camera_fovy=45.0),
        concept_prior=ConceptPriorConfig(train=dataclasses.replace(tiny_train, steps=200),
                                         steps_before_aug=100, n_init_views=8, img2img_strength=0.5,
                                         img2img_steps=20, guidance_scale=3.0),
        reference_prior=ReferencePriorConfig(train=dataclasses.replace(tiny_train, steps=200),
                                             n_color=12, n_normal=0, camera_mode="paper"),
        init=InitConfig(sdf_fit_steps=200, sdf_fit_points=2048, albedo_fit_steps=150),
        guidance=GuidanceConfig(guidance_scale=3.0, reference_guidance_scale=1.0, lora_rank=4, lora_lr=1e-3,
                                contextual_views=2, view_prompts=False, normal_distillation=False),
        geometry=GeometryConfig(grid_resolution=32, n_levels=6, n_features_per_level=2, log2_hashmap_size=14,
                                base_resolution=8, per_level_scale=1.5, sdf_hidden=32, sdf_layers=1,
                                material_hidden=32, material_layers=2),
        optim=OptimConfig(lr_geometry_encoding=2e-3, lr_geometry_mlp=2e-4, lr_material=1e-2, lr_background=1e-2),
        camera=CameraConfig(fovy=(40.0, 50.0)),
        render=RenderConfig(resolution=64, batch_size=1, turntable_views=12, turntable_resolution=128,
                            texture_size=256),
        steps=300,
        checkpoint_every=100,
        log_every=10,
        seed=0,
    )
