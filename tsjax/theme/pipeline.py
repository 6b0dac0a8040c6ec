"""The ThemeStation pipeline end to end (what ``python -m tsjax.optimize`` runs).

Stages (paper section 3; numbers from the config):

1. **Theme prior**: every exemplar is rendered (``theme_prior.n_views`` views, elevation 0/20 deg, random
   azimuth); the base model's UNet is fine-tuned on them with "a 3D model of <class>, in the style of
   <token>" and the camera condition. ``n_concepts`` concept images are sampled from the concept
   viewpoint (CFG) and ranked (:func:`rank_concepts`), or one is given with ``--concept``.
2. **Initial model**: ``--init MESH`` or the built-in nearest-exemplar init (:mod:`tsjax.theme.init`).
3. **Priors of stage 2**: the concept prior (fine-tuned on the concept image + init renders, then on the
   concept image + img2img-augmented init renders) and the reference prior (colour + normal exemplar
   renders, ", normal map" prompts).
4. **Stage 2**: DMTet fitted to the init model, then optimised with DSD + contextual loss +
   regularisers (:mod:`tsjax.theme.stage2`), checkpointed every ``checkpoint_every`` steps. With
   ``--devices 1`` (default) the assets run one after another; with ``--devices N`` all K assets
   (K a multiple of N) are prepared first and their stage 2 runs as ONE loop, K/N assets per device over
   the ``asset`` mesh axis (:mod:`tsjax.parallel`; same per-asset results up to float round-off).
5. **Outputs** per asset: ``asset_<k>/model.glb`` + ``model.obj``, turntables (colour, normal), loss
   curve, ``metrics.jsonl``; for the run ``index.html`` and ``manifest.json``.

Prior initialisation: with the tiny preset (from-scratch models) the reference and concept priors and
the VSD LoRA's base start from the theme prior's UNet (a from-scratch model has nothing else to start
from); with pretrained weights they start from the pretrained UNet, as in the paper.

Randomness: one root key ``jax.random.key(seed)``; every stage folds in a fixed name, so a run is a
deterministic function of (config, inputs). Intermediate results are cached under ``<out>/cache`` so
``--resume`` continues exactly where a run stopped.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from tsjax.config import Config, guidance_t_ranges, to_dict

__all__ = ["RunOptions", "NonFiniteLossError", "run", "rank_concepts", "check_out_dir", "prepare_out_dir",
           "build_dmtet_config"]


class NonFiniteLossError(RuntimeError):
    """Stage 2 produced a NaN/inf loss; the message names the term and the kept checkpoint."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Command-line level options of a run (see ``python -m tsjax.optimize --help``)."""

    out: Path
    num_assets: int = 1
    init_mesh: str | None = None
    concept: str | None = None
    weights: str | None = None
    vgg: str | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    backend: str = "auto"


def _key(root: jax.Array, name: str) -> jax.Array:
    return jax.random.fold_in(root, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# output directory and caches
# ----------------------------------------------------------------------------------------------


def check_out_dir(cfg: Config, opts: RunOptions) -> bool:
    """Validate ``opts.out`` without touching it; returns whether an existing run is to be wiped
    (``--overwrite``). Raises ``ValueError`` for an existing non-empty folder without ``--resume`` /
    ``--overwrite``, a ``--resume`` with another config or with nothing to resume."""
    out = Path(opts.out)
    cfg_json = json.dumps(to_dict(cfg), sort_keys=True)
    if out.exists() and any(out.iterdir()):
        if opts.resume:
            saved = out / "config.json"
            if not saved.is_file():
                raise ValueError(f"--out {out}: --resume needs a previous run there (config.json missing)")
            if json.dumps(json.loads(saved.read_text()), sort_keys=True) != cfg_json:
                raise ValueError(f"--out {out}: --resume with a different config than the stopped run "
                                 f"(compare {saved})")
            return False
        if opts.overwrite:
            return True
        raise ValueError(f"--out {out} already exists; pass --resume to continue it or --overwrite to replace it")
    if opts.resume and not out.exists():
        raise ValueError(f"--out {out}: nothing to resume (the folder does not exist)")
    return False


def prepare_out_dir(cfg: Config, opts: RunOptions, *, wipe: bool | None = None) -> Path:
    """Create/validate ``opts.out`` (:func:`check_out_dir`): refuses an existing non-empty folder unless
    ``--resume`` (same config) or ``--overwrite`` (wiped). ``wipe``: the result of a :func:`check_out_dir`
    the caller already made (the folder is then not validated again)."""
    out = Path(opts.out)
    if check_out_dir(cfg, opts) if wipe is None else wipe:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache").mkdir(exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1, sort_keys=True))
    return out


def _save_tree(path: Path, tree: Any) -> None:
    from flax import serialization

    host = jax.tree_util.tree_map(np.asarray, tree)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(serialization.msgpack_serialize(host))
    tmp.replace(path)


def _load_tree(path: Path) -> Any:
    from flax import serialization

    return jax.tree_util.tree_map(jnp.asarray, serialization.msgpack_restore(path.read_bytes()))


def _cached(path: Path, fn: Callable[[], Any]) -> Any:
    """Load ``path`` if present (a previous, interrupted run), else compute, save and return."""
    if path.is_file():
        return _load_tree(path)
    val = fn()
    _save_tree(path, val)
    return val


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def build_dmtet_config(cfg: Config):
    """:class:`tsjax.geometry.dmtet.DMTetConfig` from the geometry section (capacities derived when 0:
    ``max_faces = max(8192, 48 * grid_resolution^2)``, room for a surface a few times the area of the
    grid's mid-section)."""
    from tsjax.geometry.dmtet import DMTetConfig
    from tsjax.geometry.hashgrid import HashGridConfig

    g = cfg.geometry
    hg = HashGridConfig(n_levels=g.n_levels, n_features=g.n_features_per_level,
                        log2_table_size=g.log2_hashmap_size, base_resolution=g.base_resolution,
                        per_level_scale=g.per_level_scale)
    max_faces = g.max_faces or max(8192, 48 * g.grid_resolution ** 2)
    return DMTetConfig(grid_resolution=g.grid_resolution, grid_scale=g.grid_scale, max_faces=max_faces,
                       max_verts=g.max_verts or None, sdf_grid=hg, sdf_hidden=g.sdf_hidden, sdf_layers=g.sdf_layers,
                       material_grid=hg, material_hidden=g.material_hidden, material_layers=g.material_layers,
                       progressive_update_steps=g.progressive_update_steps)


def rank_concepts(images: np.ndarray, scores: np.ndarray, *, min_fg: float = 0.03, max_fg: float = 0.7) -> np.ndarray:
    """Order of concept images, best first: images whose foreground fraction lies in ``[min_fg, max_fg]``
    (an object on a white background) come first, each group by ascending theme-prior denoising loss
    ``scores`` (lower = more typical of the theme)."""
    from tsjax.theme.priors import foreground_mask

    fg = foreground_mask(images).mean(axis=(1, 2))
    bad = (fg < min_fg) | (fg > max_fg)
    return np.lexsort((np.asarray(scores), bad.astype(np.int32)))


def _load_image(path: str, res: int) -> np.ndarray:
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--concept {path}: image file not found")
    try:
        im = Image.open(p)
        im.load()
    except Exception as e:  # PIL raises several types for unreadable files
        raise ValueError(f"--concept {path}: not a readable image ({e})") from None
    if im.mode in ("RGBA", "LA") or "transparency" in im.info:
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    im = im.convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((res, res), Image.BICUBIC)
    return np.asarray(im, np.float32) / 255.0


class _Progress:
    """tqdm bars per phase (step/s, ETA) on stderr; silent when disabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bars: dict[str, Any] = {}

    def bar(self, name: str, total: int, initial: int = 0):
        if not self.enabled:
            return None
        from tqdm import tqdm

        b = tqdm(total=total, initial=initial, desc=name, file=sys.stderr, dynamic_ncols=True, unit="step")
        self.bars[name] = b
        return b

    def tick(self, name: str, total: int):
        if not self.enabled:
            return
        b = self.bars.get(name) or self.bar(name, total)
        b.update(1)
        if b.n >= total:
            b.close()

    def ticker(self, name: str, total: int) -> Callable[[str, int], None] | None:
        if not self.enabled:
            return None
        return lambda _d, _i: self.tick(name, total)


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


def run(cfg: Config, opts: RunOptions) -> dict:
    """Run the whole pipeline; returns the manifest (also written to ``<out>/manifest.json``)."""
    from tsjax.data.mesh import load_exemplars, load_mesh
    from tsjax.data.renders import exemplar_cameras, render_exemplar_views
    from tsjax.render.camera import camera_condition, make_cameras, sample_orbit_cameras
    from tsjax.render.mesh_render import render_mesh
    from tsjax.theme import outputs as O
    from tsjax.theme import priors as P
    from tsjax.theme.init import nearest_exemplar_init
    from tsjax.theme.prompts import concept_prompt, theme_prompt

    from tsjax import parallel as par

    t_start = time.perf_counter()
    if opts.num_assets < 1:
        raise ValueError(f"--num-assets must be >= 1, got {opts.num_assets}")
    nproc, main = jax.process_count(), jax.process_index() == 0
    if nproc > 1 and cfg.perf.devices != jax.device_count():
        raise ValueError(f"multi-process run ({nproc} processes): --devices must be the global device count "
                         f"{jax.device_count()} (got {cfg.perf.devices}), so every process optimises its share")
    mesh = None
    if cfg.perf.devices > 1:
        if opts.num_assets % cfg.perf.devices:
            raise ValueError(f"--devices {cfg.perf.devices}: --num-assets {opts.num_assets} is not a multiple of the "
                             f"device count (the assets are split evenly over the devices)")
        from tsjax.parallel import make_mesh

        mesh = make_mesh(cfg.perf.devices)  # clear error when fewer devices are visible
    if opts.vgg is not None and not Path(opts.vgg).is_file():
        raise FileNotFoundError(f"--vgg {opts.vgg}: VGG19 weights file not found")
    if opts.init_mesh is not None and not Path(opts.init_mesh).is_file():
        raise FileNotFoundError(f"--init {opts.init_mesh}: mesh file not found")
    uses_weights = any(t.model == "weights" for t in (cfg.theme_prior.train, cfg.concept_prior.train,
                                                      cfg.reference_prior.train))
    if uses_weights:
        if opts.weights is None:
            raise ValueError(f"config {cfg.name!r} fine-tunes pretrained weights: pass --weights DIR (a local "
                             f"Stable Diffusion 2.1-base folder)")
        w = Path(opts.weights)
        if not w.is_dir():
            raise FileNotFoundError(f"--weights {w}: no such directory")
        missing = [p for p in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")
                   if not (w / p).exists()]
        if missing:
            raise FileNotFoundError(f"--weights {w}: missing {', '.join(missing)} (expected a diffusers Stable "
                                    f"Diffusion folder)")
    exemplars = load_exemplars(cfg.data.exemplars)
    if not exemplars:
        raise ValueError(f"--exemplars {cfg.data.exemplars}: no meshes found")
    concept_image = None
    if opts.concept is not None and not opts.concept.lstrip("-").isdigit():
        concept_image = _load_image(opts.concept, cfg.render.resolution)
        if opts.num_assets != 1:
            raise ValueError("--concept PATH gives one concept image: use --num-assets 1")
    if nproc == 1:
        out = prepare_out_dir(cfg, opts)
    else:  # every process validates the same folder state; then process 0 alone creates/wipes it
        wipe = check_out_dir(cfg, opts)
        par.barrier("tsjax-out-checked")
        out = prepare_out_dir(cfg, opts, wipe=wipe) if main else Path(opts.out)
        par.barrier("tsjax-out-ready")
        if not main:  # process 0 computes and caches the shared stages; the others then load them
            log(f"      process {jax.process_index()}/{nproc}: waiting for process 0's shared stages")
            par.barrier("tsjax-shared-stages")
    cache = out / "cache"
    prog = _Progress(opts.progress)
    root = jax.random.key(cfg.seed)
    tp, cp, rp, g = cfg.theme_prior, cfg.concept_prior, cfg.reference_prior, cfg.guidance
    res = cfg.render.resolution
    cls, token = cfg.data.class_name, cfg.data.token
    bgc = cfg.data.background
    y_theme = theme_prompt(cls, token)
    y_normal = theme_prompt(cls, token, normal=True, normal_suffix=rp.normal_suffix)
    y_concept = concept_prompt(cls, token)
    timings: dict[str, float] = {}

    # ---- renders of the exemplars ------------------------------------------------------------
    t0 = time.perf_counter()
    log(f"[1/5] rendering {len(exemplars)} exemplar(s)")
    ex = render_exemplar_views(exemplars, tp.n_views, res, _key(root, "exemplar_views"), mode="paper",
                               distance=tp.camera_distance, fovy=tp.camera_fovy, background=bgc, backend=opts.backend)
    M = len(exemplars)
    theme_imgs = ex["color"].reshape(-1, res, res, 3)
    theme_cams = np.asarray(ex["cams"].c2w).reshape(-1, 16)
    n_ref = -(-max(rp.n_color, rp.n_normal) // M)
    rr = render_exemplar_views(exemplars, n_ref, res, _key(root, "reference_views"), mode=rp.camera_mode,
                               distance=tp.camera_distance, fovy=tp.camera_fovy, background=bgc, backend=opts.backend)
    ref_col = rr["color"].reshape(-1, res, res, 3)[: rp.n_color]
    ref_nrm = rr["normal"].reshape(-1, res, res, 3)[: rp.n_normal]
    ref_cams = np.asarray(rr["cams"].c2w).reshape(-1, 16)
    (out / "exemplars").mkdir(exist_ok=True)
    ex_files = []
    for i in range(M):
        f = out / "exemplars" / f"exemplar_{i}.png"
        if main:
            O.save_png(f, O.contact_sheet(ex["color"][i][: min(tp.n_views, 6)], cols=6))
        ex_files.append(str(f.relative_to(out)))
    timings["render_exemplars_s"] = time.perf_counter() - t0

    # ---- stage 1: base model, theme prior, concept images ---------------------------------------
    t0 = time.perf_counter()
    base = P.load_base(tp.train, opts.weights, _key(root, "base"), seed=cfg.seed)
    if tp.train.model == "tiny" and tp.train.vae_steps > 0:
        vae_imgs = np.concatenate([theme_imgs, ref_col, ref_nrm])
        vae = _cached(cache / "vae.msgpack", lambda: P.train_vae(
            base, vae_imgs, tp.train.vae_steps, _key(root, "vae"), batch_size=tp.train.batch_size,
            progress=prog.ticker("vae", tp.train.vae_steps)).params["vae"])
        base = dataclasses.replace(base, params={**base.params, "vae": vae})
    from_scratch = tp.train.model == "tiny"
    theme_steps = tp.steps_single if M == 1 else tp.steps_group
    log(f"[2/5] theme prior: {theme_steps} steps on {len(theme_imgs)} renders ('{y_theme}')")
    theme_unet = _cached(cache / "theme_prior.msgpack", lambda: P.finetune_unet(
        base, base.params["unet"], theme_imgs, [y_theme] * len(theme_imgs), theme_cams, tp.train, theme_steps,
        _key(root, "theme_prior"), progress=prog.ticker("theme prior", theme_steps)))
    timings["theme_prior_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ccams = make_cameras(np.array([tp.concept_elevation]), np.array([tp.concept_azimuth]), tp.camera_distance,
                         fovy=tp.camera_fovy)
    ccond = np.asarray(camera_condition(ccams))
    cpath = cache / "concepts.msgpack"
    if cpath.is_file():
        cc = _load_tree(cpath)
        concepts, scores = np.asarray(cc["images"]), np.asarray(cc["scores"])
    else:
        log(f"      sampling {tp.n_concepts} concept images")
        concepts = P.sample_images(base, theme_unet, [y_theme] * tp.n_concepts, _key(root, "concepts"), resolution=res,
                                   steps=tp.sample_steps, guidance_scale=tp.guidance_scale,
                                   cameras=np.repeat(ccond, tp.n_concepts, 0))
        scores = P.denoise_scores(base, theme_unet, concepts, y_theme, _key(root, "concept_scores"),
                                  np.repeat(ccond, tp.n_concepts, 0))
        _save_tree(cpath, {"images": concepts, "scores": scores})
    order = rank_concepts(concepts, scores)
    (out / "concepts").mkdir(exist_ok=True)
    concept_files = []
    for i, im in enumerate(concepts):
        if main:
            O.save_png(out / "concepts" / f"concept_{i}.png", im)
        concept_files.append(f"concepts/concept_{i}.png")
    if concept_image is not None:
        if main:
            O.save_png(out / "concepts" / "concept_given.png", concept_image)
        chosen_imgs, chosen_ids = [concept_image], [-1]
    elif opts.concept is not None:
        idx = int(opts.concept)
        if not 0 <= idx < len(concepts):
            raise ValueError(f"--concept {idx}: there are {len(concepts)} concept images (0..{len(concepts) - 1})")
        if opts.num_assets != 1:
            raise ValueError("--concept IDX selects one concept image: use --num-assets 1")
        chosen_imgs, chosen_ids = [concepts[idx]], [idx]
    else:
        if opts.num_assets > len(concepts):
            raise ValueError(f"--num-assets {opts.num_assets} exceeds the {len(concepts)} concept images sampled "
                             f"(raise theme_prior.n_concepts)")
        chosen_ids = [int(i) for i in order[: opts.num_assets]]
        chosen_imgs = [concepts[i] for i in chosen_ids]
    timings["concepts_s"] = time.perf_counter() - t0

    # ---- reference prior ----------------------------------------------------------------------
    t0 = time.perf_counter()
    prior_init = theme_unet if from_scratch else base.params["unet"]
    ref_steps = rp.train.steps
    log(f"[3/5] reference prior: {ref_steps} steps on {len(ref_col)} colour + {len(ref_nrm)} normal renders")
    ref_unet = None if guidance_t_ranges(g)["reference"] is None else _cached(  # unused by concept_only
        cache / "reference_prior.msgpack", lambda: P.finetune_unet(
        base, prior_init, np.concatenate([ref_col, ref_nrm]),
        [y_theme] * len(ref_col) + [y_normal] * len(ref_nrm),
        np.concatenate([ref_cams[: len(ref_col)], ref_cams[: len(ref_nrm)]]), rp.train, ref_steps,
        _key(root, "reference_prior"), progress=prog.ticker("reference prior", ref_steps)))
    timings["reference_prior_s"] = time.perf_counter() - t0
    if nproc > 1 and main:
        par.barrier("tsjax-shared-stages")  # the other processes load the caches written above

    # prompt tables shared by every asset
    from tsjax.theme.prompts import view_prompts

    tables = {
        "concept": P.encode_prompts(base, view_prompts(y_concept, g.view_prompts)),
        "theme": P.encode_prompts(base, view_prompts(y_theme, g.view_prompts)),
        "normal": P.encode_prompts(base, view_prompts(y_normal, g.view_prompts)),
        "uncond": P.encode_prompts(base, [""])[0],
    }
    features, feat_params = _contextual_features(opts.vgg)

    def prepare_asset(k: int, cimg: np.ndarray, cid: int) -> dict:
        """Init model, concept prior and pseudo-views of asset ``k`` (cached in ``asset_<k>/``)."""
        adir = out / f"asset_{k}"
        adir.mkdir(exist_ok=True)
        akey = _key(root, f"asset_{k}")
        O.save_png(adir / "concept.png", cimg)
        # ---- init model ------------------------------------------------------------------------
        if opts.init_mesh is not None:
            init_mesh, init_info = load_mesh(opts.init_mesh), {"method": "user", "path": str(opts.init_mesh)}
        else:
            init_mesh, init_info = nearest_exemplar_init(exemplars, P.foreground_mask(cimg[None], bgc)[0], ccams,
                                                         backend=opts.backend)
        init_cams, _ = sample_orbit_cameras(jax.random.fold_in(akey, 1), cp.n_init_views,
                                            elevation=cfg.camera.elevation, azimuth=cfg.camera.azimuth,
                                            distance=cfg.camera.distance, fovy=cfg.camera.fovy)
        init_r = render_mesh(init_mesh, init_cams, res, background=bgc, backend=opts.backend)
        init_imgs = np.asarray(init_r["color"])
        init_cond = np.asarray(camera_condition(init_cams))
        O.save_png(adir / "init.png", O.contact_sheet(init_imgs[:6], cols=6))
        # ---- concept prior ---------------------------------------------------------------------
        t0 = time.perf_counter()
        log(f"[4/5] asset {k}: concept prior ({cp.steps_before_aug} + {cp.train.steps - cp.steps_before_aug} steps, "
            f"img2img strength {cp.img2img_strength})")
        n_rep = max(1, cp.n_init_views)
        c_imgs = np.repeat(cimg[None], n_rep, 0)
        c_cams = np.repeat(ccond, n_rep, 0)
        prompts1 = [y_concept] * (n_rep + len(init_imgs))
        cpp = adir / "concept_prior.msgpack"
        pvp = adir / "pseudo_views.msgpack"
        if cpp.is_file() and pvp.is_file():
            concept_unet = _load_tree(cpp)
            pseudo = np.asarray(_load_tree(pvp)["images"])
        else:
            st: dict = {}
            tick = prog.ticker(f"concept prior {k}", cp.train.steps)
            u1 = P.finetune_unet(base, prior_init, np.concatenate([c_imgs, init_imgs]), prompts1,
                                 np.concatenate([c_cams, init_cond]), cp.train, cp.steps_before_aug,
                                 jax.random.fold_in(akey, 2), progress=tick, state_out=st)
            pseudo = P.sample_images(base, u1, [y_concept] * len(init_imgs), jax.random.fold_in(akey, 3),
                                     resolution=res, steps=cp.img2img_steps, guidance_scale=cp.guidance_scale,
                                     cameras=init_cond, init_images=init_imgs, strength=cp.img2img_strength)
            concept_unet = P.finetune_unet(base, u1, np.concatenate([c_imgs, pseudo]), prompts1,
                                           np.concatenate([c_cams, init_cond]), cp.train,
                                           cp.train.steps - cp.steps_before_aug, jax.random.fold_in(akey, 4),
                                           progress=tick, resume_state=st["state"])
            _save_tree(cpp, concept_unet)
            _save_tree(pvp, {"images": pseudo})
        O.save_png(adir / "pseudo_views.png", O.contact_sheet(pseudo[:6], cols=6))
        return {"index": k, "cid": cid, "adir": adir, "akey": akey, "init_mesh": init_mesh, "init_info": init_info,
                "init_cams": init_cams, "concept_unet": concept_unet, "pseudo": pseudo,
                "concept_prior_s": time.perf_counter() - t0}

    def finish_asset(a: dict, result: dict, t_stage2: float) -> dict:
        """Outputs of one asset (mesh, turntables, loss curve) and its manifest record."""
        adir = a["adir"]
        files = _asset_outputs(cfg, opts, adir, result, exemplars, ex)
        records = O.read_jsonl(adir / "metrics.jsonl")
        O.loss_curve_png(adir / "loss_curve.png", records,
                         ["loss_concept", "loss_ref_color", "loss_ref_normal", "loss_lora", "loss_contextual"])
        return {"index": a["index"], "concept_id": a["cid"], "init": a["init_info"], "dir": adir.name,
                "concept_prior_s": a["concept_prior_s"], "stage2_s": t_stage2, **files,
                "concept": f"{adir.name}/concept.png", "init_png": f"{adir.name}/init.png",
                "pseudo_views": f"{adir.name}/pseudo_views.png", "loss_curve": f"{adir.name}/loss_curve.png",
                "stage2_steps": result["steps"], "final_metrics": records[-1] if records else {}}

    common = _stage2_common(cfg, opts, base, theme_unet=theme_unet, ref_unet=ref_unet, tables=tables,
                            features=features, feat_params=feat_params, from_scratch=from_scratch)
    assets = []
    if mesh is None:  # one asset at a time (devices == 1)
        for k, (cimg, cid) in enumerate(zip(chosen_imgs, chosen_ids)):
            a = prepare_asset(k, cimg, cid)
            t0 = time.perf_counter()
            (result,) = _stage2(cfg, opts, common, [a], prog=prog)
            assets.append(finish_asset(a, result, time.perf_counter() - t0))
    else:  # all assets prepared first, then ONE stage-2 loop sharded over the asset mesh axis
        mine = par.process_asset_indices(mesh, len(chosen_imgs))  # every asset when single-process
        if nproc > 1:
            log(f"      process {jax.process_index()}/{nproc}: assets {mine}")
        prepared = [prepare_asset(k, chosen_imgs[k], chosen_ids[k]) for k in mine]
        t0 = time.perf_counter()
        results = _stage2(cfg, opts, common, prepared, prog=prog, mesh=mesh, num_assets=len(chosen_imgs))
        t_group = time.perf_counter() - t0
        timings["stage2_group_s"] = t_group
        assets = [finish_asset(a, r, t_group) for a, r in zip(prepared, results)]
        if nproc > 1:  # every process publishes its assets' records; all read everyone's
            for a in assets:
                O.write_json(out / a["dir"] / "record.json", a)
            par.barrier("tsjax-assets-done")
            assets = [json.loads((out / f"asset_{k}" / "record.json").read_text()) for k in range(len(chosen_imgs))]

    gallery_assets = [{"index": a["index"], "concept": a["concept"], "init": a["init_png"],
                       "pseudo_views": a["pseudo_views"], "turntable_color": a["turntable_color"],
                       "turntable_normal": a["turntable_normal"], "loss_curve": a["loss_curve"],
                       "files": [a["glb"], a["obj"], a["turntable_gif"]]} for a in assets]
    if main:
        O.write_gallery(out / "index.html", title=f"tsjax ThemeStation: {cls} ({cfg.data.exemplars})",
                        exemplars=ex_files, concepts=concept_files, chosen=[c for c in chosen_ids if c >= 0],
                        assets=gallery_assets)
    manifest = {"config": cfg.name, "exemplars": cfg.data.exemplars, "num_exemplars": M, "class": cls,
                "prompts": {"theme": y_theme, "normal": y_normal, "concept": y_concept},
                "guidance_mode": g.mode, "t_ranges": guidance_t_ranges(g), "concept_scores": scores.tolist(),
                "concept_order": [int(i) for i in order], "chosen_concepts": chosen_ids, "assets": assets,
                "timings": {**timings, "total_s": time.perf_counter() - t_start},
                "devices": cfg.perf.devices, "processes": nproc,
                "stage2_mode": "sharded" if mesh is not None else "sequential",
                "contextual_features": "vgg19 relu3_4" if opts.vgg else "rgb 5x5 patches (no --vgg)"}
    if main:
        O.write_json(out / "manifest.json", manifest)
    return manifest


def _contextual_features(vgg: str | None):
    from tsjax.theme.stage2 import patch_features

    if vgg is None:
        return patch_features, None
    from tsjax.metrics.vgg import load_vgg

    module, variables = load_vgg(vgg, "vgg19", ("relu3_4",))
    return (lambda p, x: module.apply(p, x)["relu3_4"]), variables


def _lora_parts(model, base_unet: Any, rank: int, key: jax.Array):
    """Trainable LoRA params ``{"lora": factors, "camera": camera-embedding leaves}`` and the apply fn."""
    from flax import traverse_util

    from tsjax.diffusion.lora import init_lora, merge_lora

    flat = traverse_util.flatten_dict(base_unet)
    cam = {"/".join(k): v for k, v in flat.items() if any("camera" in p for p in k)}
    if not cam:
        raise ValueError("the VSD LoRA needs a camera-conditioned UNet (no camera embedding parameters found)")
    train = {"lora": init_lora(key, base_unet, rank, None), "camera": cam}

    def lora_apply(p, x, t, ctx, camera):
        f = dict(traverse_util.flatten_dict(p["base"]))
        for name, v in p["train"]["camera"].items():
            f[tuple(name.split("/"))] = v
        unet = merge_lora(traverse_util.unflatten_dict(f), p["train"]["lora"], 1.0)
        return model.unet_apply(unet, x, t, ctx, camera)

    return train, lora_apply


def _stage2_common(cfg: Config, opts: RunOptions, base, *, theme_unet, ref_unet, tables, features, feat_params,
                   from_scratch: bool) -> dict:
    """What every asset's stage 2 shares: DMTet config, tet grid, the networks in ``perf``'s compute dtype,
    the reference prior, the LoRA base, prompt tables, contextual features. Built once per run, so the
    per-asset inputs of K assets have identical structure (same static ``apply`` functions) and the shared
    ones are the same arrays (replicated once over the device mesh)."""
    from tsjax.geometry.tets import build_tet_grid
    from tsjax.guidance.dsd import PriorPrompts
    from tsjax.guidance.vsd import Denoiser
    from tsjax.theme import stage2 as S

    g = cfg.guidance
    dm = build_dmtet_config(cfg)
    grid = build_tet_grid(dm.grid_resolution, scale=dm.grid_scale)
    fast = S.with_compute(base, cfg.perf)  # the networks in perf's compute dtype / attention implementation
    unet_apply = lambda p, x, t, c, cam: fast.unet_apply(p, x, t, c, cam)  # noqa: E731
    tr = guidance_t_ranges(g)
    reference = None
    if tr["reference"] is not None:
        reference = PriorPrompts(Denoiser(unet_apply, ref_unet), tables["theme"], tables["normal"], tables["uncond"])
    return {"dm": dm, "grid": grid, "fast": fast, "unet_apply": unet_apply, "t_ranges": tr, "reference": reference,
            "lora_base": theme_unet if from_scratch else base.params["unet"], "base": base, "tables": tables,
            "features": features, "feat_params": feat_params, "optimizer": S.make_optimizer(cfg.optim, g.lora_lr)}


def _stage2_spec(cfg: Config, opts: RunOptions, common: dict, lora_apply: Callable, n_pseudo: int):
    from tsjax.guidance.dsd import DSDSettings
    from tsjax.theme import stage2 as S

    g, tr, base = cfg.guidance, common["t_ranges"], common["base"]
    K = min(g.contextual_views, n_pseudo) if g.contextual else 0
    return S.Stage2Spec(
        dmtet=common["dm"], resolution=cfg.render.resolution, batch_size=cfg.render.batch_size, context_views=K,
        contextual_weight=g.contextual_weight,
        dsd=DSDSettings(concept_t=tr["concept"], reference_t=tr["reference"], alpha=g.alpha, beta=g.beta,
                        guidance_scale=g.guidance_scale, reference_guidance_scale=g.reference_guidance_scale,
                        normal_distillation=g.normal_distillation,
                        camera_dropout=g.camera_dropout),
        reg=cfg.reg, camera=cfg.camera, vae_encode=common["fast"].vae_encode, scaling_factor=base.scaling_factor,
        lora_apply=lora_apply, scheduler=base.scheduler, features=common["features"], backend=opts.backend,
        perf=cfg.perf)


def _stage2_key(cfg: Config, akey: jax.Array) -> jax.Array:
    """An asset's stage-2 key: ``fold_in(asset key, 14)``, and ``cfg.stage2_seed`` folded in when non-zero."""
    key = jax.random.fold_in(akey, 14)
    return jax.random.fold_in(key, cfg.stage2_seed) if cfg.stage2_seed else key


def _stage2_asset(cfg: Config, opts: RunOptions, common: dict, a: dict) -> dict:
    """Per-asset stage-2 setup: DMTet fitted to the init model (cached), LoRA, concept prior and contextual
    targets -> ``inputs``, a fresh ``state`` (restored from ``ckpt/`` on ``--resume``: ``restored_step``)."""
    from tsjax.checkpoint import Checkpointer
    from tsjax.geometry.dmtet import init as dm_init
    from tsjax.guidance.dsd import PriorPrompts
    from tsjax.guidance.vsd import Denoiser
    from tsjax.theme import stage2 as S
    from tsjax.theme.init import fit_dmtet_to_mesh

    adir, akey, dm, tables = a["adir"], a["akey"], common["dm"], common["tables"]
    log(f"[5/5] asset {adir.name}: fitting DMTet (grid {dm.grid_resolution}) to the init model")
    geo = _cached(adir / "geo_init.msgpack", lambda: fit_dmtet_to_mesh(
        dm_init(jax.random.fold_in(akey, 10), dm), dm, a["init_mesh"], jax.random.fold_in(akey, 11),
        sdf_steps=cfg.init.sdf_fit_steps, n_points=cfg.init.sdf_fit_points, albedo_steps=cfg.init.albedo_fit_steps,
        backend=opts.backend))
    lora_train, lora_apply = _lora_parts(common["fast"], common["lora_base"], cfg.guidance.lora_rank,
                                         jax.random.fold_in(akey, 12))
    concept = PriorPrompts(Denoiser(common["unet_apply"], a["concept_unet"]), tables["concept"], None,
                           tables["uncond"])
    spec = _stage2_spec(cfg, opts, common, lora_apply, len(a["pseudo"]))
    ctx_feats = None
    if spec.context_views > 0:
        ctx_feats = jax.jit(common["features"])(common["feat_params"], jnp.asarray(a["pseudo"], jnp.float32))
    inputs = S.Stage2Inputs(grid=common["grid"], vae=common["base"].params["vae"], concept=concept,
                            reference=common["reference"], lora_base=common["lora_base"], lora_color=tables["theme"],
                            lora_normal=tables["normal"], context_feats=ctx_feats,
                            context_c2w=jnp.asarray(a["init_cams"].c2w), context_proj=jnp.asarray(a["init_cams"].proj),
                            feature_params=common["feat_params"])
    inputs = S.prepare_inputs(inputs, cfg.perf)  # frozen weights stored in the compute dtype (bf16 on GPU)
    opt = common["optimizer"]
    state = S.init_state(geo, S.init_background(jax.random.fold_in(akey, 13)), lora_train, opt)
    ck = Checkpointer(adir / "ckpt")
    return {"adir": adir, "spec": spec, "inputs": inputs, "state": state, "ck": ck,
            "restored_step": ck.latest_step() if opts.resume else None, "key": _stage2_key(cfg, akey)}


def _stage2(cfg: Config, opts: RunOptions, common: dict, prepared: list[dict], *, prog: _Progress,
            mesh=None, num_assets: int | None = None) -> list[dict]:
    """Stage 2 of the assets in ``prepared`` (``prepare_asset`` records) in ONE loop; returns per asset
    ``{"geo", "bg", "dm", "grid", "steps", "compile_and_first_step_s"}``.

    ``mesh is None``: exactly one asset, the single-asset jitted step (:func:`tsjax.theme.stage2.make_step`).
    Otherwise the K assets (a multiple of the mesh's ``asset`` axis) run together with
    :func:`tsjax.theme.stage2.make_sharded_step`: per-asset states, concept priors, contextual targets and
    keys split over the ``asset`` axis, everything else replicated; in a multi-process run ``prepared`` holds
    this process's assets only (:func:`tsjax.parallel.process_asset_indices` of ``num_assets``, the group's
    size) and each process feeds, reads back and checkpoints those. Both modes share the loop: progress bar,
    one ``metrics.jsonl`` per asset (``time_s`` = wall time of the whole step), a checkpoint per asset every
    ``checkpoint_every`` steps and at the end, resume from the checkpoints (all assets of a group resume at
    the newest step every asset has), Ctrl-C saving, and the NaN stop (:class:`NonFiniteLossError` naming
    the asset(s) and terms; every asset's last good state is saved).
    """
    from tsjax import parallel as par
    from tsjax.checkpoint import save_on_interrupt, state_is_alive
    from tsjax.theme import stage2 as S

    runs = [_stage2_asset(cfg, opts, common, a) for a in prepared]
    if mesh is None and len(runs) != 1:
        raise ValueError(f"internal: the single-device stage 2 runs one asset at a time, got {len(runs)}")
    opt = common["optimizer"]
    spec = runs[0]["spec"]
    meta = {"config": to_dict(cfg)}
    # ---- resume: every asset of the group continues from the same step --------------------------------
    restored = [r["restored_step"] for r in runs]
    start = 0
    # the newest step every asset of the group has, over all processes (-1: some asset has none)
    common_step = par.min_over_processes(min(restored) if all(s is not None for s in restored) else -1)
    if common_step >= 0:
        start = common_step
        for r in runs:
            if start not in r["ck"].all_steps():
                raise ValueError(f"--resume: {r['adir'] / 'ckpt'} has no checkpoint of step {start}, the newest step "
                                 f"every asset of the group has; delete the group's ckpt/ folders to restart stage 2")
            r["state"] = r["ck"].restore(r["state"], step=start)
        log(f"      resumed {', '.join(r['adir'].name for r in runs)} at step {start}")
    elif any(s is not None for s in restored):
        log("      some assets of the group have no stage-2 checkpoint: stage 2 restarts from step 0")
    for r in runs:
        mp = r["adir"] / "metrics.jsonl"
        kept = [x for x in _read(mp) if x["step"] < start]
        mp.write_text("".join(json.dumps(x) + "\n" for x in kept))
    total = int(cfg.steps)

    if mesh is None:
        (r0,) = runs
        step_fn = S.make_step(spec, opt)
        state = r0["state"]

        def advance(st):
            new, m = step_fn(st, r0["inputs"], r0["key"])
            return new, [{k: float(v) for k, v in jax.device_get(m).items()}]

        split = lambda st: [st]  # noqa: E731
        name = f"stage 2 ({r0['adir'].name})"
    else:
        K = len(runs) if num_assets is None else int(num_assets)
        multi = S.make_sharded_step(spec, opt, mesh)
        per, shared = zip(*[S.split_inputs(r["inputs"]) for r in runs])
        per = par.shard_local_assets(per, mesh, K)
        shared = par.replicate(shared[0], mesh)
        keys = par.shard_local_assets([r["key"] for r in runs], mesh, K)
        state = par.shard_local_assets([r["state"] for r in runs], mesh, K)

        def advance(st):
            new, m = multi(st, per, keys, shared)
            return new, [{k: float(v) for k, v in row.items()} for row in par.local_asset_rows(m)]

        split = par.local_asset_rows
        name = f"stage 2 ({K} assets on {mesh.shape[par.ASSET]} devices)" + (
            f", process {jax.process_index()}: {len(runs)}" if jax.process_count() > 1 else "")
    holder = {"state": state}

    def save_all(st) -> list[int]:
        """Checkpoint every asset of ``st`` at its own step; returns the steps."""
        steps = []
        for r, s in zip(runs, split(st)):
            r["ck"].save(int(s.step), s, meta=meta)
            steps.append(int(s.step))
        return steps

    def save_now():
        if state_is_alive(holder["state"]):
            save_all(holder["state"])

    bar = prog.bar(name, total, initial=start)
    t_compile = None
    dirs = ", ".join(str(r["adir"] / "ckpt") for r in runs)
    with save_on_interrupt(save_now, message=f"interrupted: checkpoint kept in {dirs}; continue with --resume"):
        files = [(r["adir"] / "metrics.jsonl").open("a") for r in runs]
        try:
            for i in range(start, total):
                t0 = time.perf_counter()
                new, mhs = advance(holder["state"])
                holder["state"] = new
                if t_compile is None:
                    t_compile = time.perf_counter() - t0
                bad_assets = [(r, mh) for r, mh in zip(runs, mhs) if mh["finite"] == 0.0]
                if bad_assets:
                    # a non-finite step leaves that asset's state unchanged: ``new`` holds the last good states
                    steps = save_all(new)
                    what = []
                    for r, mh in bad_assets:
                        bad = [t for t in S.LOSS_TERMS if not np.isfinite(mh[t])]
                        what.append(f"{', '.join(bad) if bad else 'the gradients'}"
                                    + (f" of {r['adir'].name}" if mesh is not None else ""))
                    r_bad = bad_assets[0][0]
                    raise NonFiniteLossError(
                        f"non-finite loss at stage-2 step {i} in {'; '.join(what)}; stopped, last good state kept in "
                        f"{r_bad['adir'] / 'ckpt'} (step {steps[runs.index(r_bad)]})")
                dt = time.perf_counter() - t0
                for f, mh in zip(files, mhs):
                    f.write(json.dumps({"step": i, **mh, "time_s": dt}) + "\n")
                    if i % max(cfg.log_every, 1) == 0:
                        f.flush()
                if bar is not None:
                    bar.update(1)
                    if i % max(cfg.log_every, 1) == 0:
                        bar.set_postfix(dsd=f"{mhs[0]['loss_dsd']:.3g}", faces=int(mhs[0]["num_faces"]))
                if (i + 1) % max(cfg.checkpoint_every, 1) == 0 and i + 1 < total:
                    save_all(holder["state"])
        finally:
            for f in files:
                f.close()
    if bar is not None:
        bar.close()
    save_all(holder["state"])
    results = []
    for r, st in zip(runs, split(holder["state"])):
        r["ck"].close()
        results.append({"geo": jax.tree_util.tree_map(jnp.asarray, st.params["geo"]), "dm": common["dm"],
                        "grid": common["grid"], "steps": int(st.step), "compile_and_first_step_s": t_compile,
                        "bg": st.params["bg"]})
    return results


def _read(path: Path) -> list[dict]:
    from tsjax.theme.outputs import read_jsonl

    return read_jsonl(path)


def _asset_outputs(cfg: Config, opts: RunOptions, adir: Path, result: dict, exemplars, ex) -> dict:
    """Export the mesh (GLB + OBJ), turntable renders, and comparison metrics against the exemplars."""
    from tsjax.geometry.dmtet import albedo, extract
    from tsjax.geometry.marching import compact_mesh
    from tsjax.geometry.render import render_trimesh
    from tsjax.metrics.geometric import chamfer_distance, palette_distance
    from tsjax.render.camera import make_cameras
    from tsjax.theme import outputs as O
    from tsjax.theme.export import export_asset

    geo, dm, grid = result["geo"], result["dm"], result["grid"]
    mesh = extract(geo, grid, dm)
    if int(mesh.num_faces) == 0:
        raise ValueError(f"{adir.name}: stage 2 produced an empty surface (no faces); try more init steps or "
                         f"a different --init")
    verts, faces = compact_mesh(mesh)
    files = export_asset(adir, verts, faces, lambda p: albedo(geo, p, dm), texture_size=cfg.render.texture_size,
                         backend=opts.backend)
    n = cfg.render.turntable_views
    tr = cfg.render.turntable_resolution
    cams = make_cameras(np.full(n, 15.0), np.linspace(0.0, 360.0, n, endpoint=False), 1.9, fovy=45.0)
    r = jax.jit(lambda g, c: render_trimesh(extract(g, grid, dm), lambda p: albedo(g, p, dm), c, tr,
                                            background=cfg.data.background, shading="lambert",
                                            backend=opts.backend))(geo, cams)
    color, normal = np.asarray(r["color"]), np.asarray(r["normal"])
    alb_r = jax.jit(lambda g, c: render_trimesh(extract(g, grid, dm), lambda p: albedo(g, p, dm), c, tr,
                                                background=cfg.data.background, shading="unlit",
                                                backend=opts.backend))(geo, cams)
    O.save_png(adir / "turntable_color.png", O.contact_sheet(color, cols=6))
    O.save_png(adir / "turntable_normal.png", O.contact_sheet(normal, cols=6))
    O.save_gif(adir / "turntable.gif", np.concatenate([color, normal], axis=2))
    # comparisons with the exemplars: geometry (chamfer) and palette (unlit albedo renders, Lab W1)
    from tsjax.render.mesh_render import render_mesh

    chamfers = [chamfer_distance((verts, faces), (m.vertices, m.faces), n=5000) for m in exemplars]
    ex_alb = [np.asarray(render_mesh(m, cams, tr, lighting="none", background=cfg.data.background,
                                     backend=opts.backend)[k]) for m in exemplars for k in ("color", "mask")]
    ex_imgs = np.concatenate(ex_alb[0::2])
    ex_masks = np.concatenate(ex_alb[1::2])
    pal = palette_distance(np.asarray(alb_r["color"]), ex_imgs, np.asarray(alb_r["mask"]), ex_masks)
    d = adir.name
    return {"glb": f"{d}/{files['glb'].name}", "obj": f"{d}/{files['obj'].name}",
            "turntable_color": f"{d}/turntable_color.png", "turntable_normal": f"{d}/turntable_normal.png",
            "turntable_gif": f"{d}/turntable.gif", "num_vertices": int(len(verts)), "num_faces": int(len(faces)),
            "chamfer_to_exemplars": chamfers, "palette_distance_to_exemplars": pal}
