"""Probe: block-wise reconstruction applied after the fact to a pruned output, in memory.

    python benchmarks/recon_probe.py --pruned OLICA20_DIR --lr 2e-5 --epochs 2 --nsamples 256 --windows 64
    python benchmarks/recon_probe.py --pruned OLICA20_DIR --epochs 0 --windows 64      # the output as it is

Layer by layer on the pruned stream of the C4 calibration windows (seed 0), the pruned layer's
weights are fitted by ``streamprune.methods.cascade.reconstruct.reconstruct_layer`` (cascade's
own kernel) to the dense layer's output (``--target global``: to the dense model's own
stream), then WikiText-2 perplexity over the first ``--windows`` 128-token windows, fp32.
The demo model is small enough to hold in memory; this is the ablation "reconstruction
without cascade's allocation" of benchmarks/RESULTS.md. One JSON line last.
"""
import time, json, argparse, math
import torch, torch.nn.functional as F
from streamprune.adapters import open_model, load_tokenizer
from streamprune.inputs.textdata import resolve_text_source, calibration_windows, eval_windows
from streamprune.stream import position_embeddings
from streamprune.methods.cascade.reconstruct import reconstruct_layer, ReconSettings

p = argparse.ArgumentParser()
p.add_argument("--pruned", required=True)
p.add_argument("--lr", type=float, default=1e-4)
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--bs", type=int, default=8)
p.add_argument("--nsamples", type=int, default=256)
p.add_argument("--loss", default="rms")
p.add_argument("--windows", type=int, default=200)
p.add_argument("--val", type=int, default=32)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--target", default="local")
p.add_argument("--schedule", default="constant", help="learning rate: constant or cosine")
p.add_argument("--tag", default="")
a = p.parse_args()
torch.set_num_threads(a.threads)
from streamprune.inputs.demo_model import ensure_demo_model
DEMO = ensure_demo_model()
dense_ad, pr_ad = open_model(DEMO), open_model(a.pruned)
tok = load_tokenizer(DEMO)
calib = calibration_windows(tok, resolve_text_source("c4"), a.nsamples, 128, 0)
outer = dense_ad.read_outer()
emb = outer["model.embed_tokens.weight"].float(); normw = outer["model.norm.weight"].float()
pe = position_embeddings(dense_ad.rotary("cpu"), 128, "cpu", torch.float32)
X = F.embedding(calib, emb); Xd = X.clone()
layers, t0 = [], time.time()
S = ReconSettings(epochs=a.epochs, lr=a.lr, batch_tokens=a.bs*128, val_rows=a.val, loss=a.loss, schedule=a.schedule)
with torch.no_grad():
  for l in range(dense_ad.num_layers):
    D = dense_ad.build_layer(l, dense_ad.read_layer(l), "cpu", torch.float32)
    P = pr_ad.build_layer(l, pr_ad.read_layer(l), "cpu", torch.float32)
    Yd = torch.cat([D(x, pe) for x in Xd.split(64)])
    if a.target == "global":
        ch = lambda: zip(X.split(64), Yd.split(64))
    else:
        ch = lambda: iter(X.split(64))
    Xd = Yd
    if a.epochs:
        r = reconstruct_layer(P, D, ch, pe, X.shape[0], S, seed=l)
        print(f"layer {l}: val {r.val_before:.4g} -> {r.val_after:.4g} ({r.val_after/r.val_before:.3f}) ep {r.best_epoch} t={time.time()-t0:.0f}s curve {' '.join(f'{v/r.val_before:.3f}' for v in r.history)}", flush=True)
    X = torch.cat([P(x, pe) for x in X.split(64)])
    layers.append(P)
  ev = eval_windows(tok, resolve_text_source("wikitext2"), 128, a.windows)
  nll, cnt = 0.0, 0
  for i in range(0, ev.shape[0], 16):
    h = F.embedding(ev[i:i+16], emb)
    for L in layers: h = L(h, pe)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + dense_ad.config.rms_norm_eps) * normw
    logits = F.linear(h, emb)
    nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ev[i:i+16, 1:].reshape(-1), reduction="sum").item()
    cnt += ev[i:i+16, 1:].numel()
print(json.dumps({**vars(a), "ppl": math.exp(nll / cnt), "time": time.time() - t0}), flush=True)
