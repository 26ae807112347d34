"""``hf-sparse predict CHECKPOINT INPUT...``: run a checkpoint on audio or image files, one line per input.

Speech checkpoints read audio files (decoded with soundfile, resampled with soxr to the feature
extractor's rate) and print the label (classifiers) or the greedy CTC transcript; ``--stream`` feeds
each file in chunks through :func:`hf_sparse.stream` instead of one offline forward. Image
checkpoints (timm, or with a saved image processor) print the label. ``--runtime`` picks PyTorch as
saved (``dense``), the sparse kernels (``sparse``) or ONNX Runtime (``onnx``, from
``export --format onnx``). ``--timing`` adds each input's latency and, for audio, its real-time
factor (processing time / audio duration). An input that cannot be read exits with status 2 and
names it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..families import SPEECH_MODEL_TYPE

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class PredictError(ValueError):
    """Bad input to ``predict``; the message names what and where."""


def _fail(message: str) -> int:
    print(f"hf-sparse predict: error: {message}", file=sys.stderr)
    return 2


def expand_inputs(paths: list[str], suffixes: tuple[str, ...]) -> list[Path]:
    """Files as given, and the files with one of ``suffixes`` inside each folder (recursively, sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
            if not found:
                raise PredictError(f"{p}: the folder holds no {'/'.join(s.lstrip('.') for s in suffixes[:4])} files")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise PredictError(f"{p}: no such file or folder")
    return out


class _Predictor:
    """The loaded checkpoint, its preprocessing and how to turn outputs into a printed answer."""

    def __init__(self, checkpoint: str, runtime: str):
        from ..checkpoint.save_and_load import load_sparse, read_sparsity, resolve_checkpoint
        from .checkpoint import _model_dir

        path = Path(checkpoint)
        folder = _model_dir(path) if path.is_dir() else resolve_checkpoint(checkpoint)
        self.folder = folder
        self.model = load_sparse(folder, runtime=runtime)
        self.runtime = runtime
        sparsity = read_sparsity(folder)
        self.config = getattr(self.model, "config", None)
        model_type = getattr(self.config, "model_type", None)
        self.speech = model_type == SPEECH_MODEL_TYPE
        self.ctc = self.speech and (hasattr(self.model, "lm_head")
                                    or "output_lengths" in (getattr(self.model, "output_names", None) or []))
        labels = getattr(self.config, "id2label", None) or {}
        self.labels = {int(k): v for k, v in labels.items()}
        if self.speech:
            from transformers import AutoFeatureExtractor

            from .. import models  # noqa: F401  (registers the speech feature extractor)

            self.fe = AutoFeatureExtractor.from_pretrained(folder)
            self.rate = int(self.fe.sampling_rate)
        else:
            self.transform = self._image_transform(folder, sparsity)

    def _image_transform(self, folder: Path, sparsity: dict):
        if (folder / "preprocessor_config.json").is_file():
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(folder)
            return lambda image: processor(image, return_tensors="pt")["pixel_values"]
        if sparsity.get("library") == "timm" or "pretrained_cfg" in _json(folder / "config.json"):
            import timm.data

            cfg = _json(folder / "config.json").get("pretrained_cfg") or {}
            data_cfg = timm.data.resolve_data_config(pretrained_cfg=cfg)
            chans = int((cfg.get("input_size") or [3])[0])
            tf = timm.data.create_transform(**data_cfg)
            return lambda image: tf(image.convert("L" if chans == 1 else "RGB"))[None]
        raise PredictError(f"{folder}: no image preprocessing recorded (no preprocessor_config.json, not a timm "
                           "model), so raw images cannot be prepared for it")

    # -- one input ---------------------------------------------------------------------------------
    def read(self, path: Path) -> Any:
        if self.speech:
            from ..data import DataError
            from ..data.audio_io import load_audio

            try:
                return load_audio(str(path), self.rate)
            except DataError as e:
                raise PredictError(str(e)) from None
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                image.load()
                return image.copy()
        except (UnidentifiedImageError, OSError) as e:
            raise PredictError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None

    def predict(self, item: Any, stream: Any = None, chunk: int = 80) -> str:
        import torch

        if stream is not None:
            stream.reset()
            for i in range(0, len(item), chunk):
                stream.feed(item[i:i + chunk])
            update = stream.finish()
            return update.text if self.ctc else f"{update.label}\t{float(update.posterior.max()):.4f}"
        with torch.no_grad():
            if self.speech:
                inputs = self.fe(item, return_tensors="pt")
                out = self.model(input_features=inputs["input_features"], attention_mask=inputs["attention_mask"])
            else:
                out = self.model(pixel_values=self.transform(item))
        logits = out["logits"] if isinstance(out, dict) else getattr(out, "logits", out)
        logits = torch.as_tensor(logits)
        if self.ctc:
            lengths = out.get("output_lengths") if isinstance(out, dict) else getattr(out, "output_lengths", None)
            frames = logits[0, : int(lengths[0])] if lengths is not None else logits[0]
            blank = int(getattr(self.config, "pad_token_id", 0) or 0)
            ids, prev = [], blank
            for i in frames.argmax(-1).tolist():
                if i != prev and i != blank:
                    ids.append(i)
                prev = i
            pieces = [self.labels.get(i, str(i)) for i in ids]
            return ("" if all(len(p) == 1 for p in pieces) else " ").join(pieces)
        probs = torch.softmax(logits[0].float(), -1)
        k = int(probs.argmax())
        return f"{self.labels.get(k, str(k))}\t{float(probs[k]):.4f}"


def _json(path: Path) -> dict:
    import json

    return json.loads(path.read_text()) if path.is_file() else {}


def predict_cmd(args: argparse.Namespace) -> int:
    """Print one prediction per input (``path<TAB>label<TAB>score`` or ``path<TAB>transcript``)."""
    from ..checkpoint.save_and_load import CheckpointError

    try:
        predictor = _Predictor(args.checkpoint, args.runtime)
        files = expand_inputs(args.inputs, AUDIO_SUFFIXES if predictor.speech else IMAGE_SUFFIXES)
        stream = None
        if args.stream:
            if not predictor.speech:
                raise PredictError("--stream is for speech checkpoints")
            if args.runtime == "onnx":
                raise PredictError("--stream runs on PyTorch (--runtime dense or sparse); ONNX Runtime takes whole "
                                   "utterances")
            from ..runtime.streaming import SpeechStream, StreamingError

            try:
                stream = SpeechStream(predictor.model, predictor.fe)
            except StreamingError as e:
                raise PredictError(str(e)) from None
        chunk = int(predictor.rate * args.chunk_ms / 1000) if predictor.speech else 0
        if predictor.speech and chunk < 1:
            raise PredictError(f"--chunk-ms {args.chunk_ms} is shorter than one sample")
        total_time = total_audio = 0.0
        for path in files:
            item = predictor.read(path)
            started = time.perf_counter()
            answer = predictor.predict(item, stream, chunk)
            elapsed = time.perf_counter() - started
            line = f"{path}\t{answer}"
            if args.timing:
                line += f"\t{elapsed * 1e3:.2f} ms"
                if predictor.speech:
                    duration = len(item) / predictor.rate
                    line += f"\tRTF {elapsed / duration:.4f}" if duration else "\tRTF -"
                    total_audio += duration
                total_time += elapsed
            print(line, flush=True)
        if args.timing and files:
            summary = f"{len(files)} inputs, {total_time * 1e3 / len(files):.2f} ms each on average"
            if total_audio:
                summary += f", real-time factor {total_time / total_audio:.4f}"
            print(f"# {summary} ({args.runtime} runtime{', streaming' if stream else ''}, "
                  f"{__import__('torch').get_num_threads()} torch thread(s))")
    except (PredictError, CheckpointError, OSError) as e:
        return _fail(str(e))
    return 0


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="run a checkpoint on audio or image files and print its predictions",
                       description="Print one line per input: the label and its probability, or the CTC "
                                   "transcript. Folders are searched recursively for audio (speech checkpoints) "
                                   "or image files.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint folder, run directory or Hub repo id")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders")
    p.add_argument("--runtime", choices=("dense", "sparse", "onnx"), default="dense",
                   help="PyTorch as saved, the sparse kernels, or ONNX Runtime (needs export --format onnx)")
    p.add_argument("--stream", action="store_true", help="speech: feed each file in chunks (hf_sparse.stream)")
    p.add_argument("--chunk-ms", type=float, default=10.0, help="chunk length for --stream (default 10 ms)")
    p.add_argument("--timing", action="store_true", help="add per-input latency and real-time factor")
    p.set_defaults(func=predict_cmd)


__all__ = ["PredictError", "add_subcommand", "expand_inputs", "predict_cmd"]
