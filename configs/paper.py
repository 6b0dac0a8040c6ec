"""The paper's / official code's numbers (method notes). Needs ``--weights DIR``: a local Stable
Diffusion 2.1-base folder (diffusers layout: model_index.json, unet/, vae/, text_encoder/, tokenizer/,
scheduler/). Every prior is a full DreamBooth fine-tune of that model; stage 2 renders 512 px on a
192^3 tetrahedral grid for 5000 steps (an 80 GB accelerator, 1-2 hours per asset in the original).
"""
import dataclasses

from tsjax.config import (ConceptPriorConfig, Config, GeometryConfig, GuidanceConfig, PriorTrainConfig,
                          ReferencePriorConfig, RenderConfig, ThemePriorConfig)


def get_config() -> Config:
    sd = PriorTrainConfig(model="weights", steps=200, lr=2e-6, batch_size=8, resolution=512, vae_steps=0,
                          camera=True, camera_dropout=0.1)
    return Config(
        name="paper",
        theme_prior=ThemePriorConfig(train=sd, n_views=20, steps_single=200, steps_group=400, n_concepts=8,
                                     sample_steps=50, guidance_scale=7.5),
        concept_prior=ConceptPriorConfig(train=dataclasses.replace(sd, steps=300),
                                         steps_before_aug=150, n_init_views=20, img2img_strength=0.5),
        reference_prior=ReferencePriorConfig(train=dataclasses.replace(sd, steps=150),
                                             n_color=30, n_normal=30),
        guidance=GuidanceConfig(mode="dsd", alpha=0.2, beta=1.0, guidance_scale=7.5, lora_rank=4, lora_lr=1e-4,
                                contextual=True, contextual_weight=100.0, contextual_views=4),
        geometry=GeometryConfig(grid_resolution=192, max_faces=600_000),
        render=RenderConfig(resolution=512, batch_size=1, turntable_views=36, turntable_resolution=512,
                            texture_size=1024),
        steps=5000,
        checkpoint_every=500,
    )
