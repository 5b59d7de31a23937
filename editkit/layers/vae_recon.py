"""A prepared split through an RGBA VAE, laid out for `editkit eval --metrics rgba`.

`reconstruct_prepared` writes OUT/pred/<id>.png (the RGBA reconstructions, posterior mode, 8-bit)
and OUT/targets.jsonl, a pairs manifest with one record per component (and, with composites,
per composite): id = the prepared file's name without .png (`<sample>_comp000`,
`<sample>_composite`), target_image = that file, instruction = the layer's description. Each
PNG is written atomically; a re-run writes everything again.
"""

from __future__ import annotations

from pathlib import Path

from editkit.errors import UserError


def reconstruct_prepared(vae_path: str | Path, root: str | Path, out: str | Path, split: str = "val",
                         include_composites: bool = True, device: str | None = None,
                         progress: bool = True) -> Path:
    """Reconstruct every item of `root`'s `split` with the VAE at `vae_path`; returns OUT/targets.jsonl."""
    import torch

    from editkit.data.manifest import write_manifest
    from editkit.data.records import EditRecord
    from editkit.layers.dataset import ComponentDataset
    from editkit.layers.rgba_vae import load_rgba_vae, reconstruct, to_pil
    from editkit.utils.atomic import atomic_path
    from editkit.utils.dist import resolve_device
    from editkit.utils.progress import make_progress

    out, root = Path(out), Path(root)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose an output folder for --out")
    data = ComponentDataset(root, split, include_composites)
    device = resolve_device(device)
    vae = load_rgba_vae(vae_path).to(device)
    records = []
    with make_progress("images", disable=not progress) as bar, torch.no_grad():
        task = bar.add_task("reconstruct", total=len(data), status="")
        for index, (entry_index, layer) in enumerate(data.items):
            entry = data.entries[entry_index]
            rel = entry.composite if layer < 0 else entry.layers[layer]
            text = "" if layer < 0 or layer >= len(entry.descriptions) else entry.descriptions[layer]
            name = Path(rel).stem
            rec = reconstruct(vae, data[index]["component"][None].to(device))[0]
            with atomic_path(out / "pred" / f"{name}.png") as tmp:
                to_pil(rec).save(tmp, format="PNG")
            records.append(EditRecord(id=name, instruction=text or "composite", target=(root / rel).resolve()))
            bar.advance(task)
    return write_manifest(records, out / "targets.jsonl", "pairs")
