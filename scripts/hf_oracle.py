#!/usr/bin/env python3
"""Independent Hugging Face oracle for moeforge: checks, for every supported architecture, that
a transformers checkpoint runs in moeforge (HF -> moeforge) and that a moeforge checkpoint loads in
transformers (moeforge -> HF), comparing fp32 logits and the next-token CE loss both ways. For MoE
models it also compares the routing of every token in every MoE layer: only near-ties may differ,
and where one does, the logits and loss are compared, at every position and with the same
tolerance, against transformers rerun with moeforge's routing forced at each such (layer, token).

Usage: python3 scripts/hf_oracle.py --moeforge build/moeforge [--device cpu|cuda] [--out r.json]
Exit code: 0 all checks pass, 1 some check failed, 2 torch/transformers/safetensors/numpy missing.
"""
import argparse
import contextlib
import copy
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers
    from safetensors import safe_open
except ImportError as err:
    print(f"SKIP: {err}; hf_oracle.py needs torch, transformers, safetensors and numpy",
          file=sys.stderr)
    sys.exit(2)

LOGIT_TOL = 1e-4  # max abs logit error (logits are O(1))
LOSS_TOL = 1e-4  # abs error of the mean CE loss
# moeforge on the GPU computes in bf16 (8-bit mantissa, ~2^-9 relative error per rounding, a few
# dozen roundings deep): logits of magnitude ~1 agree to a few 1e-2. Each check also reports, for
# comparison, transformers' own bf16-vs-fp32 error on the same model (hf_bf16_noise).
BF16_LOGIT_TOL = 6e-2
BF16_LOSS_TOL = 1e-2
MAX_FORCING_ROUNDS = 4  # forced transformers reruns before new routing differences fail a check
BATCH, SEQ = 2, 13
SEED = 1234

# Small odd shapes; every architecture has hidden 48 and vocab 97 and exercises its own quirks.
COMMON = dict(vocab_size=97, hidden_size=48, num_hidden_layers=2, intermediate_size=37,
              max_position_embeddings=64, hidden_act="silu", rms_norm_eps=1e-5,
              rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
              bos_token_id=1, eos_token_id=2)
ARCHS = {
    # tied embeddings, GQA 6:2
    "LlamaForCausalLM": dict(model_type="llama", num_attention_heads=6, num_key_value_heads=2,
                             tie_word_embeddings=True, attention_bias=False, mlp_bias=False),
    # q/k/v bias, GQA 4:2
    "Qwen2ForCausalLM": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2,
                             tie_word_embeddings=False, use_sliding_window=False),
    # q/k norm, head_dim 10 != 48 / 3, MQA, tied
    "Qwen3ForCausalLM": dict(model_type="qwen3", num_attention_heads=3, num_key_value_heads=1,
                             head_dim=10, tie_word_embeddings=True, attention_bias=False,
                             use_sliding_window=False),
    # 5 experts top-2
    "MixtralForCausalLM": dict(model_type="mixtral", num_attention_heads=8, num_key_value_heads=4,
                               num_local_experts=5, num_experts_per_tok=2, sliding_window=None,
                               router_jitter_noise=0.0, tie_word_embeddings=False),
    # 6 experts top-3, no top-k renormalisation, shared expert with sigmoid gate, q/k/v bias
    "Qwen2MoeForCausalLM": dict(model_type="qwen2_moe", num_attention_heads=6,
                                num_key_value_heads=3, num_experts=6, num_experts_per_tok=3,
                                moe_intermediate_size=19, shared_expert_intermediate_size=23,
                                norm_topk_prob=False, qkv_bias=True, decoder_sparse_step=1,
                                mlp_only_layers=[], use_sliding_window=False,
                                tie_word_embeddings=False),
    # 5 experts top-2, head_dim 14 != 48 / 4, layer 1 of 3 dense
    "Qwen3MoeForCausalLM": dict(model_type="qwen3_moe", num_hidden_layers=3, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=14, num_experts=5,
                                num_experts_per_tok=2, moe_intermediate_size=19,
                                norm_topk_prob=True, mlp_only_layers=[1], decoder_sparse_step=1,
                                attention_bias=False, use_sliding_window=False,
                                tie_word_embeddings=False),
}
EAGER = dict(attn_implementation="eager", experts_implementation="eager")
# With --moeforge-device cuda: cuDNN attention needs head_dim % 8 == 0, so the shapes change to the
# nearest ones it takes (still not powers of two where the CPU shapes were not).
CUDA_OVERRIDES = {
    "Qwen2ForCausalLM": dict(num_attention_heads=6, num_key_value_heads=2),  # head_dim 8
    "Qwen3ForCausalLM": dict(head_dim=24),
    "MixtralForCausalLM": dict(num_attention_heads=6, num_key_value_heads=3),  # head_dim 8
    "Qwen3MoeForCausalLM": dict(head_dim=24),
}
MOEFORGE_DEVICE = "cpu"  # set from --moeforge-device
FIELD_OVERRIDES = {}  # set from --set, applied to every architecture (for diagnosis)


def arch_fields(arch):
    """The HF config.json fields (model_type included) of one test architecture."""
    overrides = CUDA_OVERRIDES.get(arch, {}) if MOEFORGE_DEVICE == "cuda" else {}
    return {**COMMON, **ARCHS[arch], **overrides, **FIELD_OVERRIDES}


def cross_entropy(logits, tokens):
    """Mean next-token CE over positions 0..seq-2, like moeforge's ce_loss."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           tokens[:, 1:].reshape(-1)).item()


def hf_logits(model, tokens, device):
    model.to(device).eval()
    with torch.no_grad():
        return model(input_ids=tokens.to(device)).logits.float().cpu().numpy()


def router_logits(model, tokens, device):
    """Per MoE layer, the router logits [tokens, experts] as fp32 numpy arrays (None when the
    model reports none)."""
    with torch.no_grad():
        out = model(input_ids=tokens.to(device), output_router_logits=True)
    logits = getattr(out, "router_logits", None)
    return [l.float().cpu().numpy() for l in logits] if logits else None


def top_k_set(logits, k):
    """Each token's set of routed experts (ascending ids) from one layer's router logits."""
    return np.sort(np.argsort(-logits, axis=-1, kind="stable")[:, :k], axis=-1)


def routing_margins(logits, k):
    """Each token's gap between its k-th and (k+1)-th router logit: how close it is to a tie."""
    ordered = -np.sort(-logits, axis=-1)
    return ordered[:, k - 1] - ordered[:, k]


def hf_bf16_noise(model, tokens, device, theirs, fp32_routers, result):
    """transformers' own bf16 error, reported beside moeforge's: the same model run in bf16
    against its fp32 logits, and for MoE models the number of (layer, token) routings bf16 changes
    and the nearest routing tie. fp32_routers: the model's router logits (None for a dense
    model)."""
    k = getattr(model.config, "num_experts_per_tok", None)
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    theirs_bf16 = hf_logits(model_bf16, tokens, device)
    result["hf_bf16_max_abs_err"] = float(np.abs(theirs_bf16 - theirs).max())
    result["hf_bf16_ce_err"] = abs(cross_entropy(theirs_bf16, tokens)
                                   - cross_entropy(theirs, tokens))
    if fp32_routers is not None and k < fp32_routers[0].shape[-1]:
        result["min_routing_margin"] = float(min(routing_margins(l, k).min()
                                                 for l in fp32_routers))
        bf16_routers = router_logits(model_bf16, tokens, device)
        result["hf_bf16_routing_flips"] = int(sum(
            (top_k_set(a, k) != top_k_set(b, k)).any(axis=-1).sum()
            for a, b in zip(fp32_routers, bf16_routers)))
        result["routed_tokens"] = int(sum(l.shape[0] for l in fp32_routers))


def moe_gates(model):
    """The router (`gate`) of every MoE layer, in layer order."""
    return [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "experts")]


def forcing_hook(gate, routes):
    """A forward hook for one MoE layer's router that routes each token row in routes to the
    experts routes[row] (moeforge's), weighted as the router weights its own choice: the fp32
    softmax of the router logits (recomputed from the router's input and weight) at those experts,
    renormalised over them where the router renormalises (Mixtral always, Qwen MoE with
    norm_topk_prob), in the dtype of the router's own top-k weights. The other rows keep the
    router's output bit for bit. Raises unless the router returns (logits, those top-k weights,
    expert ids) as transformers 5 does, checked on every row."""
    rows = torch.tensor(sorted(routes))
    experts = torch.tensor([routes[row] for row in sorted(routes)])
    renormalise = type(gate).__name__ == "MixtralTopKRouter" or gate.norm_topk_prob

    def weights(probs, ids):
        chosen = probs.gather(-1, ids)
        return chosen / chosen.sum(dim=-1, keepdim=True) if renormalise else chosen

    def hook(module, args, output):
        logits, values, ids = (output if isinstance(output, tuple) and len(output) == 3
                               and all(isinstance(t, torch.Tensor) for t in output)
                               else (torch.empty(0),) * 3)
        own = F.linear(args[0].reshape(-1, module.weight.shape[-1]), module.weight)
        probs = F.softmax(own.float(), dim=-1)
        if not (logits.shape == own.shape
                and values.shape == ids.shape == (own.shape[0], experts.shape[1])
                and torch.allclose(logits, own, rtol=1e-5, atol=1e-6)
                and torch.allclose(weights(probs, ids).to(values.dtype), values,
                                   rtol=1e-5, atol=1e-6)):
            raise RuntimeError(
                f"{type(module).__name__} does not return (router logits, their top-"
                f"{experts.shape[1]} softmax weights{' renormalised' if renormalise else ''}, "
                "the expert ids): cannot force moeforge's routing in transformers")
        at, chosen = rows.to(ids.device), experts.to(ids.device)
        chosen = chosen.gather(-1, probs[at].gather(-1, chosen).argsort(
            dim=-1, descending=True, stable=True))  # in the order the router's top-k gives
        values, ids = values.clone(), ids.clone()
        values[at] = weights(probs[at], chosen).to(values.dtype)
        ids[at] = chosen.to(ids.dtype)
        return logits, values, ids
    return hook


@contextlib.contextmanager
def forced_routing(model, forced):
    """Within it, model routes as forcing_hook does the token rows forced[l] (a dict row ->
    expert ids) of its l-th MoE layer."""
    gates = moe_gates(model)
    if len(gates) != len(forced):
        raise RuntimeError(f"{len(gates)} MoE routers in transformers, {len(forced)} MoE layers "
                           "to force")
    handles = [gate.register_forward_hook(forcing_hook(gate, routes))
               for gate, routes in zip(gates, forced) if routes]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def routing_of(model, tokens, device, moeforge_routers, fp32_routers):
    """compare's routing argument for an MoE model (None for a dense one)."""
    k = getattr(model.config, "num_experts_per_tok", None)
    if not k or not moeforge_routers or fp32_routers is None:
        return None

    def rerun(forced):
        with forced_routing(model, forced):
            return hf_logits(model, tokens, device), router_logits(model, tokens, device)
    return moeforge_routers, fp32_routers, k, rerun


def run_cli(args):
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"`{' '.join(map(str, args[:2]))}` exited {proc.returncode}: "
                           + " | ".join(tail))
    return proc.stdout


def moeforge_forward(exe, model_dir, tokens, work):
    """(logits [batch, seq, vocab], ce_loss, the MoE layers' router logits [batch * seq, experts]
    in layer order) from `moeforge forward`."""
    tokens_json, out = work / "tokens.json", work / "logits.safetensors"
    tokens_json.write_text(json.dumps(tokens.tolist()))
    out.unlink(missing_ok=True)
    run_cli([exe, "forward", "--model", model_dir, "--tokens", tokens_json, "--out", out,
             "--device", MOEFORGE_DEVICE, "--router-logits"])
    with safe_open(str(out), framework="np") as f:
        routers = sorted((int(name.split(".")[1]), f.get_tensor(name)) for name in f.keys()
                         if name.startswith("router_logits."))
        return (f.get_tensor("logits"), float(f.metadata()["ce_loss"]),
                [values for _, values in routers])


def routing_differs(mine, ref, k):
    """Per token, whether two router logits [tokens, experts] choose different top-k sets."""
    return (top_k_set(mine, k) != top_k_set(ref, k)).any(axis=-1)


def compare_routing(result, ours, theirs, k, batch, seq, forced=()):
    """moeforge's routing (top-k of its router logits) against transformers' fp32 routing (top-k
    of its fp32 router logits), per MoE layer and token. A token routed differently must either
    follow an earlier layer's difference in its sequence at that position or before (the hidden
    states differ from there on), or be a near-tie: its fp32 k-th and (k+1)-th router logits
    closer than twice the largest router-logit difference between the two over the tokens routed
    alike with nothing upstream differing. forced: per MoE layer, the token rows where the
    transformers run took moeforge's routing (forced_routing); a difference there must be a
    near-tie too but changes nothing downstream. Fills result; returns (the failure reason or
    None, per sequence the first position whose output an unforced routing difference may
    change, per MoE layer whether each token is routed differently with nothing upstream
    differing: the differences held to be near-ties)."""
    if len(ours) != len(theirs):
        return f"{len(ours)} MoE layers in moeforge, {len(theirs)} in transformers", None, None
    positions = np.arange(batch * seq) % seq
    first_diff = np.full(batch, seq)  # per sequence: the first position routed differently
    flips, noise = [], 0.0
    for mine, ref, rows in zip(ours, theirs, forced or [()] * len(theirs)):
        upstream = positions >= np.repeat(first_diff, seq)  # an earlier layer differed there
        differs = routing_differs(mine, ref, k)
        agree = ~upstream & ~differs  # the noise is measured where the routing agrees
        if agree.any():
            noise = max(noise, float(np.abs(mine - ref)[agree].max()))
        flips.append((differs & ~upstream, routing_margins(ref, k)))
        spreads = differs.copy()
        spreads[list(rows)] = False
        for token in np.flatnonzero(spreads):
            b = token // seq
            first_diff[b] = min(first_diff[b], positions[token])
    threshold = 2 * noise
    unexplained = [float(m) for own, margins in flips for m in margins[own] if m > threshold]
    result["routing_differences"] = int(sum(own.sum() for own, _ in flips))
    result["routing_noise"] = noise
    result["routing_difference_margins"] = [float(m) for own, margins in flips
                                            for m in margins[own]]
    if unexplained:
        return (f"{len(unexplained)} token(s) routed differently at fp32 router-logit margins "
                f"{unexplained} > 2 x the router-logit difference {noise:.3g}"), first_diff, None
    return None, first_diff, [own for own, _ in flips]


def tensor_shapes(model_dir):
    shapes = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="np") as f:
            for name in f.keys():
                shapes[name] = list(f.get_slice(name).get_shape())
    return shapes


def expert_tensors(shapes):
    """Layout of the expert weights ("per-expert", "fused" or "none") and the layer-0 MoE tensors
    (router, shared expert, expert 0 or the fused stacks) with their shapes."""
    moe = [n for n in shapes if re.search(r"\.(gate\.weight|experts\.|shared_expert)", n)]
    if any(re.search(r"\.experts\.\d+\.", n) for n in moe):
        layout = "per-expert"
    elif any(re.search(r"\.experts\.[a-z_]+$", n) for n in moe):
        layout = "fused"
    else:
        layout = "none"
    sample = {n: shapes[n] for n in moe
              if n.startswith("model.layers.0.") and not re.search(r"\.experts\.[1-9]\d*\.", n)}
    return layout, sample


def forced_reference(result, moeforge_routers, logits, leading, k, rerun):
    """transformers' fp32 logits [batch, seq, vocab] with moeforge's routing (moeforge_routers:
    its router logits) forced wherever it differs. logits, leading: the unforced run's logits and
    its routing differences compare_routing has held to be near-ties; rerun(forced) -> (logits,
    fp32 router logits) of a run with moeforge's routing forced (forced_routing). Those
    differences are forced and transformers rerun; the rerun's routing must pass compare_routing
    again (a forced difference as a near-tie of the rerun), and its near-ties not yet forced
    (such as a downstream difference that persists) are forced as well, for at most
    MAX_FORCING_ROUNDS reruns, until every difference is forced. Fills result; returns (the
    failure reason or None, the logits of the last run)."""
    batch, seq = logits.shape[:2]
    forced = [{} for _ in moeforge_routers]  # per MoE layer: token row -> moeforge's experts
    for rounds in range(MAX_FORCING_ROUNDS + 1):
        new = []
        for differs, routes in zip(leading, forced):
            fresh = differs.copy()
            fresh[list(routes)] = False
            new.append(np.flatnonzero(fresh))
        if not any(map(len, new)):
            result["forced_routings"], result["forcing_rounds"] = sum(map(len, forced)), rounds
            return None, logits
        if rounds == MAX_FORCING_ROUNDS:
            return (f"routing still differs at {sum(map(len, new))} more (layer, token) pair(s) "
                    f"after {rounds} reruns with moeforge's routing forced"), None
        for mine, rows, routes in zip(moeforge_routers, new, forced):
            chosen = top_k_set(mine, k)
            routes.update((int(row), chosen[row].tolist()) for row in rows)
        logits, routers = rerun(forced)
        check = {}
        reason, _, leading = compare_routing(check, moeforge_routers, routers, k, batch, seq,
                                             forced)
        if reason:
            return (f"with moeforge's routing forced at {sum(map(len, forced))} (layer, token)"
                    f" pair(s), rerun {rounds + 1}: {reason}"), None
        result["forced_routing_noise"] = check["routing_noise"]
        result["forced_routing_margins"] = check["routing_difference_margins"]


def compare(result, ours, theirs, tokens, moeforge_ce, routing=None):
    """Fills max_abs_err / loss errors; returns the failure reason or None. routing: (moeforge's
    router logits, transformers' fp32 ones, k, rerun) for MoE models: moeforge's routing must
    pass compare_routing (each difference a near-tie or downstream of one), and the logits (at
    every position) and CE loss are then checked against transformers rerun with moeforge's
    routing forced at every difference, each a near-tie of the run it is forced in
    (forced_reference). Reported beside: the logit error against the unforced run
    (max_abs_err_unforced) and its largest at the positions no routing difference reaches
    (max_abs_err_unrerouted)."""
    if ours.shape != theirs.shape:
        return f"logits shape {list(ours.shape)} != transformers {list(theirs.shape)}"
    error = np.abs(ours - theirs)
    if routing is not None:
        moeforge_routers, fp32_routers, k, rerun = routing
        result["max_abs_err_unforced"] = float(error.max())
        reason, first_diff, leading = compare_routing(result, moeforge_routers, fp32_routers,
                                                      k, *ours.shape[:2])
        if reason:
            return reason
        reached = np.arange(ours.shape[1])[None, :] >= first_diff[:, None]  # [batch, seq]
        result["max_abs_err_unrerouted"] = float(np.where(reached[:, :, None], 0.0, error).max())
        reason, theirs = forced_reference(result, moeforge_routers, theirs, leading, k, rerun)
        if reason:
            return reason
        error = np.abs(ours - theirs)
    result["max_abs_err"] = float(error.max())
    result["logit_scale"] = float(np.abs(theirs).max())
    result["ce_transformers"] = cross_entropy(theirs, tokens)
    result["ce_moeforge"] = moeforge_ce
    result["ce_err"] = abs(moeforge_ce - result["ce_transformers"])
    if not np.isfinite(ours).all():
        return "moeforge logits are not finite"
    logit_tol, loss_tol = (BF16_LOGIT_TOL, BF16_LOSS_TOL) if MOEFORGE_DEVICE == "cuda" else (
        LOGIT_TOL, LOSS_TOL)
    result["logit_tol"], result["loss_tol"] = logit_tol, loss_tol
    if result["max_abs_err"] > logit_tol:
        return f"max abs logit error {result['max_abs_err']:.3g} > {logit_tol}"
    if result["ce_err"] > loss_tol:
        return f"ce_loss error {result['ce_err']:.3g} > {loss_tol}"
    return None


def check_model(model, exe, model_dir, device, work, tokens, result):
    """transformers' logits (and fp32 router logits) of model against `moeforge forward` of
    model_dir on the same tokens; with moeforge on the GPU also transformers' own bf16 error.
    Fills result; returns compare's failure reason or None."""
    theirs = hf_logits(model, tokens, device)
    fp32_routers = (router_logits(model, tokens, device)
                    if getattr(model.config, "num_experts_per_tok", None) else None)
    if MOEFORGE_DEVICE == "cuda":
        hf_bf16_noise(model, tokens, device, theirs, fp32_routers, result)
    ours, ce, routers = moeforge_forward(exe, model_dir, tokens, work)
    return compare(result, ours, theirs, tokens, ce,
                   routing_of(model, tokens, device, routers, fp32_routers))


def hf_to_moeforge(arch, exe, device, work, tokens, result):
    """Random transformers model -> save_pretrained -> moeforge forward. Fills result (also
    when it raises, so the tensor layout is reported even if moeforge cannot load it)."""
    fields = arch_fields(arch)
    torch.manual_seed(SEED)
    config = transformers.AutoConfig.for_model(**fields, **EAGER)
    model = getattr(transformers, arch)(config).float()
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():  # make norms, biases and routers non-trivial
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model_dir = work / "hf_model"
    model.save_pretrained(model_dir)  # safetensors (always in transformers 5, the default in 4)
    shapes = tensor_shapes(model_dir)
    result["num_tensors"] = len(shapes)
    if config.model_type in ("mixtral", "qwen2_moe", "qwen3_moe"):
        result["expert_layout"], result["layer0_moe_tensors"] = expert_tensors(shapes)
        fused_dir = work / "hf_model_fused"  # the in-memory (fused) layout, for the record
        try:
            model.save_pretrained(fused_dir, save_original_format=False)
            _, result["layer0_moe_tensors_unreverted"] = expert_tensors(tensor_shapes(fused_dir))
        except TypeError as err:
            result["layer0_moe_tensors_unreverted"] = f"save_original_format unsupported: {err}"
    return check_model(model, exe, model_dir, device, work, tokens, result)


def config_mismatches(config, fields):
    """Fields that transformers reads back differently from what was written."""
    bad = []
    for key, want in fields.items():
        got = getattr(config, key, "<absent>")
        if key == "rope_parameters":
            got, want = (got or {}).get("rope_theta"), want["rope_theta"]
            key = "rope_parameters.rope_theta"
        if got != want and not (key == "mlp_only_layers" and list(got or []) == want):
            bad.append(f"{key}: wrote {want!r}, transformers reads {got!r}")
    return bad


def moeforge_to_hf(arch, exe, device, work, tokens, result):
    """moeforge init -> AutoModelForCausalLM.from_pretrained -> compare with moeforge forward."""
    fields = arch_fields(arch)
    config_path = work / "moeforge_config.json"
    config_path.write_text(json.dumps({"architectures": [arch], **fields}, indent=2))
    model_dir = work / "moeforge_model"
    run_cli([exe, "init", "--config", config_path, "--out", model_dir, "--seed", str(SEED),
             "--init-std", "0.1", "--dtype", "F32"])
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, output_loading_info=True, dtype=torch.float32, **EAGER)
    result["loading_info"] = {k: sorted(map(str, v)) for k, v in info.items()}
    problems = [f"{k}: {v}" for k, v in result["loading_info"].items() if v]
    if type(model).__name__ != arch:
        problems.append(f"transformers built {type(model).__name__}")
    problems += config_mismatches(model.config, fields)
    if problems:
        return "; ".join(problems)
    return check_model(model, exe, model_dir, device, work, tokens, result)


def main():
    global MOEFORGE_DEVICE, SEED
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moeforge", required=True, help="path of the moeforge executable")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--moeforge-device", choices=["cpu", "cuda"], default="cpu",
                        help="where moeforge runs its forward "
                             "(cuda: bf16 tolerances, cuDNN shapes)")
    parser.add_argument("--out", help="JSON report path")
    parser.add_argument("--arch", action="append", choices=list(ARCHS),
                        help="check only this architecture (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="override one config field of every checked architecture, e.g. "
                             "shared_expert_intermediate_size=24 (repeatable; for diagnosis)")
    parser.add_argument("--seed", type=int, default=SEED,
                        help="seed of the random weights and tokens")
    args = parser.parse_args()
    SEED = args.seed
    MOEFORGE_DEVICE = args.moeforge_device
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected FIELD=JSON")
        try:
            FIELD_OVERRIDES[field] = json.loads(value)
        except json.JSONDecodeError as err:
            parser.error(f"--set {item!r}: the value is not JSON ({err})")
    exe = str(Path(args.moeforge).resolve())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    transformers.utils.logging.disable_progress_bar()
    report = {"transformers": transformers.__version__, "torch": torch.__version__,
              "device": args.device, "moeforge_device": MOEFORGE_DEVICE,
              "overrides": FIELD_OVERRIDES,
              "logit_tol": BF16_LOGIT_TOL if MOEFORGE_DEVICE == "cuda" else LOGIT_TOL,
              "loss_tol": BF16_LOSS_TOL if MOEFORGE_DEVICE == "cuda" else LOSS_TOL,
              "results": []}
    for arch in args.arch or list(ARCHS):
        tokens = torch.randint(0, COMMON["vocab_size"], (BATCH, SEQ),
                               generator=torch.Generator().manual_seed(SEED + 2))
        for direction, check in (("hf->moeforge", hf_to_moeforge),
                                 ("moeforge->hf", moeforge_to_hf)):
            result = {"arch": arch, "direction": direction}
            with tempfile.TemporaryDirectory(prefix="hf_oracle_") as tmp:
                try:
                    reason = check(arch, exe, args.device, Path(tmp), tokens, result)
                except Exception as err:  # any failure is reported per check, never fatal
                    reason = f"{type(err).__name__}: {err}"
            result["status"] = "fail" if reason else "pass"
            if reason:
                result["reason"] = reason
            report["results"].append(result)
            detail = (f"max_abs_err={result['max_abs_err']:.2e} ce_err={result['ce_err']:.2e}"
                      if "ce_err" in result else "")
            if "routing_differences" in result:
                detail += (f" routing differences {result['routing_differences']} (router-logit "
                           f"difference {result['routing_noise']:.1e}; forced "
                           f"{result.get('forced_routings', '-')} in "
                           f"{result.get('forcing_rounds', '-')} rerun(s); logit error unforced "
                           f"{result.get('max_abs_err_unforced', float('nan')):.2e}, unrerouted "
                           f"{result.get('max_abs_err_unrerouted', float('nan')):.2e})")
            if "hf_bf16_max_abs_err" in result:
                detail += (f" (transformers in bf16: {result['hf_bf16_max_abs_err']:.2e}, routing"
                           f" flips {result.get('hf_bf16_routing_flips', '-')}"
                           f"/{result.get('routed_tokens', '-')}, nearest tie "
                           f"{result.get('min_routing_margin', float('nan')):.1e}; "
                           f"tol {result['logit_tol']:.2e})")
            layout = f" experts={result['expert_layout']}" if "expert_layout" in result else ""
            print(f"{arch:20s} {direction:13s} {result['status'].upper()} {detail}{layout}"
                  + (f" -- {reason}" if reason else ""), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    failed = sum(r["status"] == "fail" for r in report["results"])
    passed = sum(r["status"] == "pass" for r in report["results"])
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
