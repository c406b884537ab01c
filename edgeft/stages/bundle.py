"""A packaged bundle at run time, as an app runs it: the model, its swappable adapters, its context length. chat,
evaluate, bench and package's checks open bundles through here."""

from __future__ import annotations

from pathlib import Path

from edgeft.core import state
from edgeft.core.errors import EdgeftError

REBUILD = "rebuild the bundle with `edgeft package WS --force`"



def own_adapter(bundle: Path) -> Path | None:
    """The `.onnx_adapter` of the workspace a base+adapters bundle was packaged from (the manifest lists it first);
    None for a merged bundle. eval and bench run the bundle as the app runs that fine-tune: with it active."""
    manifest = Path(bundle) / "manifest.json"
    adapters = state.read_json(manifest, "the bundle's manifest", REBUILD).get("adapters") if manifest.is_file() else None
    if not adapters:
        return None
    try:
        return Path(bundle) / str(next(iter(adapters.values()))["file"])
    except (AttributeError, TypeError, KeyError):
        raise EdgeftError(f"the bundle's manifest {manifest} is damaged (its adapters are not described); "
                          f"{REBUILD}") from None



def open_model(bundle: Path):
    """An og.Model of a bundle; a bundle that onnxruntime-genai cannot load (a damaged genai_config.json, cut-short
    weights) is a user error that names it."""
    import onnxruntime_genai as og

    bundle = Path(bundle)
    config = bundle / "genai_config.json"
    state.read_json(config, "the bundle's genai_config.json", REBUILD, keys=("model",))
    try:
        return og.Model(str(bundle))
    except Exception as e:  # noqa: BLE001 - onnxruntime-genai raises RuntimeError (or OrtException) with its reason
        raise EdgeftError(f"onnxruntime-genai cannot load the bundle {bundle}: {str(e)[:300]}; the bundle is damaged "
                          f"or incomplete: {REBUILD}") from None



def context_length(bundle: Path) -> int | None:
    """The longest sequence (prompt and reply) the bundle's model takes, from its genai_config.json."""
    config = state.read_json(Path(bundle) / "genai_config.json", "the bundle's genai_config.json", REBUILD,
                             keys=("model",))
    length = config["model"].get("context_length") if isinstance(config["model"], dict) else None
    return int(length) if isinstance(length, int) and length > 0 else None



def load_adapter(model, path: Path) -> tuple:
    """An `.onnx_adapter` loaded into an og.Model, as (og.Adapters, name) for `generator`."""
    import onnxruntime_genai as og

    adapters = og.Adapters(model)
    try:
        adapters.load(str(path), path.stem)
    except Exception as e:  # noqa: BLE001 - onnxruntime-genai raises RuntimeError with its reason
        raise EdgeftError(f"onnxruntime-genai cannot load the adapter {path}: {str(e)[:300]}; it is damaged or was "
                          f"built for another base model: {REBUILD}") from None
    return adapters, path.stem



def generator(model, params, adapter: tuple | None = None):
    """An og.Generator, with `adapter` (from `load_adapter`) active if given."""
    import onnxruntime_genai as og

    gen = og.Generator(model, params)
    if adapter is not None:
        gen.set_active_adapter(*adapter)
    return gen

