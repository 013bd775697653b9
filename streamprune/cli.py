"""Command line: a thin shell over the Python API. Every command ends with one JSON line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path

from .errors import StreamPruneError
from .formats import FORMATS


def _options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise StreamPruneError(f"--option expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="prune a checkpoint folder layer by layer")
    p.add_argument("source", type=Path, help="Hugging Face model folder (safetensors)")
    p.add_argument("--out", type=Path, required=True, help="output folder (a loadable HF model)")
    p.add_argument("--method", default="cascade", help="pruning method: cascade (default: the best measured), olica, lorap, slimllm, magnitude")
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of all parameters to remove (default 0.2)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="method option, e.g. --option mlp_num=4")
    p.add_argument("--tokenizer", type=Path, default=None, help="folder with the tokenizer files, if SRC lacks them (copied to the output)")
    p.add_argument("--calib", default="c4", help="calibration text: c4|wikitext2|ptb, a .txt/.jsonl path, or hf:NAME[:CONFIG[:SPLIT]] (needs `datasets`, online)")
    p.add_argument("--nsamples", type=int, default=256, help="calibration windows (default 256)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per calibration window (default 128)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default=None, help="compute dtype: float32 (CPU default) | bfloat16 (CUDA default) | float16")
    p.add_argument("--chunk-tokens", type=int, default=16384, help="calibration tokens per forward chunk")
    p.add_argument("--max-gpu-memory", default=None, help="cap GPU memory, e.g. 24GiB")
    p.add_argument("--work-dir", type=Path, default=None, help="run directory (default: OUT.work next to the output)")
    p.add_argument("--fresh", action="store_true", help="discard a previous run in the work dir and start over")
    p.add_argument("--keep-work", action="store_true", help="keep activation files after success")
    p.add_argument("--dry-run", action="store_true", help="plan and forecast only")
    p.add_argument("--format", default="streamprune", choices=FORMATS,
                   help="output format: streamprune (default; every structure, loaded by transformers with our modeling file) or "
                        "nemotron-nas (DeciLM: vLLM, SGLang, TensorRT-LLM, MLX-lm, GGUF export; the servable structure)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="streamed perplexity of a dense or pruned model folder")
    p.add_argument("model", type=Path)
    p.add_argument("--dataset", default="wikitext2", help="wikitext2|ptb|c4 or a .txt/.jsonl path")
    p.add_argument("--seqlen", type=int, default=128, help="window length in tokens (papers: 128; also 2048)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first K windows")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--chunk-tokens", type=int, default=16384)
    p.add_argument("--in-memory", action="store_true", help="load the whole model with transformers instead of streaming")
    p.add_argument("--no-progress", action="store_true")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded demo model (SmolLM2-135M-Instruct)")
    p.add_argument("--method", default=None, help="default: the best available method")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--full", action="store_true", help="evaluate on the whole WikiText-2 test set")
    p.add_argument("--out", type=Path, default=None, help="default: a folder in the streamprune cache")
    p.add_argument("--nsamples", type=int, default=None)
    p.add_argument("--format", default="streamprune", choices=FORMATS,
                   help="output format (nemotron-nas: the servable structure, and a llama.cpp GGUF sample where llama.cpp is installed)")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a model folder in another runtime's format (nemotron-nas folder, llama.cpp GGUF)")
    p.add_argument("input", type=Path, help="a streamprune output folder, a nemotron-nas folder or a dense Llama-family folder")
    p.add_argument("out", type=Path, nargs="?", default=None, help="output folder (with --format)")
    p.add_argument("--format", default="nemotron-nas", choices=["nemotron-nas"], help="format of OUT")
    p.add_argument("--gguf", type=Path, default=None, metavar="FILE",
                   help="write a llama.cpp GGUF (architecture deci) to FILE; a streamprune folder goes through nemotron-nas first")
    p.add_argument("--type", default="f16", choices=["f32", "f16", "bf16", "q8_0"],
                   help="GGUF weight type (norms, biases and 1-D tensors stay f32; k-quants: llama-quantize on the f16 file)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _export(args) -> dict:
    if args.out is None and args.gguf is None:
        raise StreamPruneError("export needs OUT (a folder, with --format) or --gguf FILE")
    result = {}
    src = args.input
    if args.out is not None:
        from .formats.nemotron_nas import export

        result["nemotron_nas"] = export(args.input, args.out)
        src = args.out
    if args.gguf is not None:
        from .formats.gguf import export_gguf

        result["gguf"] = export_gguf(src, args.gguf, args.type, progress=not args.no_progress)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune(sub)
    _add_eval(sub)
    _add_demo(sub)
    _add_export(sub)
    sub.add_parser("demo-model", help="convert (once) and print the demo model folder")
    p = sub.add_parser("inspect", help="print the state of a run directory (works on a crashed run)")
    p.add_argument("work_dir", type=Path)
    args = parser.parse_args(argv)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 prints the result
    try:
        result = _run(args)
    except StreamPruneError as e:
        if not getattr(e, "quiet", False):  # quiet: another rank printed the reason
            print(f"streamprune: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except OSError as e:  # last line of defence for what no reader named (permissions, I/O errors)
        if os.environ.get("STREAMPRUNE_DEBUG"):
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"streamprune: error: {e.strerror or e}{where}: check that the path exists and is readable/writable by "
              "this user, then run the same command again (STREAMPRUNE_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: immediate stop; committed layers still count
        print("streamprune: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # a torchrun job joined a process group: leave it
            from .distributed import leave

            leave()
    if main_rank:
        print(json.dumps(result, sort_keys=True))
    return 0


def _run(args) -> dict:
    if args.command == "prune":
        # Lock the run dir and --out before the slow torch import and hold them for the whole
        # run: a second prune on either is refused at once, whenever it starts (under torchrun
        # rank 0 alone holds the locks, as in the engine).
        from .run.runlock import held, run_dir_for

        with ExitStack() as lock:
            if not args.dry_run and os.environ.get("RANK", "0") == "0":
                lock.enter_context(held(run_dir_for(args.out, args.work_dir), args.out, share=True))
            from .config import PruneConfig
            from .engine import prune

            cfg = PruneConfig(
                source=args.source, out=args.out, method=args.method, ratio=args.ratio, method_options=_options(args.option),
                calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, device=args.device,
                dtype=args.dtype, chunk_tokens=args.chunk_tokens, work_dir=args.work_dir, fresh=args.fresh,
                keep_work=args.keep_work, dry_run=args.dry_run, max_gpu_memory=args.max_gpu_memory,
                progress=not args.no_progress, tokenizer=args.tokenizer, format=args.format,
            )
            return prune(cfg)
    if args.command == "eval":
        from .evaluate import EvalConfig, perplexity, perplexity_in_memory

        cfg = EvalConfig(
            model=args.model, dataset=args.dataset, seqlen=args.seqlen, max_windows=args.max_windows, device=args.device,
            dtype=args.dtype, chunk_tokens=args.chunk_tokens, progress=not args.no_progress,
        )
        return perplexity_in_memory(cfg) if args.in_memory else perplexity(cfg)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(method=args.method, ratio=args.ratio, full=args.full, out=args.out, nsamples=args.nsamples, fmt=args.format)
    if args.command == "inspect":
        from .run.inspect import inspect_run

        return inspect_run(args.work_dir)
    if args.command == "export":
        return _export(args)
    if args.command == "demo-model":
        from .inputs.demo_model import ensure_demo_model

        return {"path": str(ensure_demo_model())}
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
