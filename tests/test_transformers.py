"""Transformers through the operator-handler analyser (no timm or transformers needed): a
ViT with fused QKV (Split+Squeeze and Gather variants), a BERT-style encoder with separate
Q/K/V, embeddings and an attention mask, and a MobileViT-style hybrid. Heads are pruned
whole (head dimension kept), MLP widths and whole attention/MLP branches too; the attention
core is a layer of its own."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_builders import TRANSFORMER_BUILDERS, bert_like, mobilevit_like, vit_like
from latprune.pruner.analysis import analyse, weight_slices
from latprune.pruner.surgery import apply_plan
from latprune.types import Plan


def _feeds(model: onnx.ModelProto, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in model.graph.input:
        shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(0, 50, shape).astype(np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = (np.arange(shape[1]) < shape[1] - 3).astype(np.float32)[None]
        else:
            feeds[i.name] = rng.normal(size=shape).astype(np.float32)
    return feeds


def _run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _heads(an):
    return [g for g in an.problem.groups if g.prunable and g.size == 4]


@pytest.mark.parametrize("name", sorted(TRANSFORMER_BUILDERS))
def test_keep_everything_is_exact_and_random_plans_are_valid(name):
    model = TRANSFORMER_BUILDERS[name]()
    an = analyse(model)
    assert an.notes == []
    feeds = _feeds(model)
    want = _run(model, feeds)
    got = _run(apply_plan(an, Plan(kept={})), feeds)
    assert all(np.abs(g - w).max() <= 1e-5 * max(1.0, np.abs(w).max()) for g, w in zip(got, want))
    rng = np.random.default_rng(3)
    prob = an.problem
    for _ in range(4):
        removed = [b.id for b in prob.blocks if rng.random() < 0.3]
        kept = {g.id: ([] if g.inner_of_block in removed else
                       sorted(rng.choice(g.size, size=int(rng.integers(1, g.size + 1)), replace=False).tolist()))
                for g in prob.groups if g.prunable}
        pruned = apply_plan(an, Plan(kept=kept, removed_blocks=removed))  # full checker
        assert [o.shape for o in _run(pruned, feeds)] == [w.shape for w in want]
        assert [i.name for i in pruned.graph.input] == [i.name for i in model.graph.input]


@pytest.mark.parametrize("gather", [False, True])
def test_vit_heads_mlp_stream_and_blocks(gather):
    an = analyse(vit_like(gather_qkv=gather))
    prob = an.problem
    ops = [layer.spec.op for layer in prob.layers]
    assert ops.count("Attention") == 2 and ops.count("MatMul") == 8
    heads = _heads(an)
    assert len(heads) == 2 and all(g.inner_of_block is not None for g in heads)
    qkv = [layer for layer in prob.layers if layer.spec.op == "MatMul" and layer.dense_c_out == 96]
    att = [layer for layer in prob.layers if layer.spec.op == "Attention"]
    for q, a in zip(qkv, att):  # fused QKV: each head is 3 x 8 output channels; the core reads 8 per head
        (gid, mult), = q.c_out.terms
        assert mult == 24 and a.c_in.terms == a.c_out.terms == [(gid, 8)]
        assert a.spec.input_hw == [17, 17] and a.spec.kernel == [8]
    assert q.spec.input_hw == [17]  # the token count is part of the MatMul's key
    mlp = [g for g in prob.groups if g.prunable and g.size == 128]
    assert len(mlp) == 2 and all(g.inner_of_block is not None for g in mlp)
    assert len(prob.blocks) == 4  # attention and MLP branches of both blocks
    stream = prob.layers[0].c_out.terms[0][0]
    assert prob.groups[stream].size == 32 and stream in an.stream_groups()
    # the class token and the positional table are sliced with the stream
    kinds = [(an.model.graph.node[i].op_type, pa.kind) for i, n in enumerate(an.model.graph.node)
             for pa in an.params.get(n.name, [])]
    assert ("Concat", "const") in kinds and ("Add", "const") in kinds and ("LayerNormalization", "ln_weight") in kinds


def test_pruning_heads_keeps_the_head_dimension():
    model = vit_like()
    an = analyse(model)
    gid = _heads(an)[0].id
    pruned = apply_plan(an, Plan(kept={gid: [0, 2]}))
    shapes = [list(onnx.numpy_helper.to_array(i)) for i in pruned.graph.initializer if i.name.endswith("__pruned")
              and onnx.numpy_helper.to_array(i).ndim == 1 and len(onnx.numpy_helper.to_array(i)) == 5]
    assert [1, 17, 3, 2, 8] in shapes  # Reshape to (B, N, 3, heads, d): 2 heads of 8 left
    qkv_w = [i for i in pruned.graph.initializer if list(i.dims) == [32, 48]]
    assert qkv_w  # 3 x 2 heads x 8
    feeds = _feeds(model)
    assert _run(pruned, feeds)[0].shape == (1, 10)


def test_bert_embeddings_mask_and_separate_qkv():
    model = bert_like()
    an = analyse(model)
    prob = an.problem
    heads = _heads(an)
    assert len(heads) == 2
    # q, k, v and the output projection's input all carry the same head group
    for h in heads:
        readers = [layer for layer in prob.layers if any(t[0] == h.id for t in layer.c_in.terms + layer.c_out.terms)]
        assert sorted(layer.spec.op for layer in readers) == ["Attention", "MatMul", "MatMul", "MatMul", "MatMul"]
    # the embedding table's columns follow the stream's channels (fixed here: the stream is the output)
    gathers = [n for n in an.model.graph.node if n.op_type == "Gather"]
    assert any(pa.kind == "weight" for n in gathers for pa in an.params.get(n.name, []))
    # the masked positions stay masked after pruning a head
    feeds = _feeds(model)
    out = _run(apply_plan(an, Plan(kept={heads[0].id: [1, 3]})), feeds)[0]
    assert out.shape == (1, 12, 32) and np.isfinite(out).all()


def test_hybrid_conv_attention_unfold_and_fold():
    an = analyse(mobilevit_like())
    prob = an.problem
    att = [layer for layer in prob.layers if layer.spec.op == "Attention"]
    assert len(att) == 1 and att[0].spec.input_hw == [64, 64]
    # the conv before the unfold and the MatMuls after it share the transformer width (24)
    conv_in = [layer for layer in prob.layers if layer.spec.op == "Conv" and layer.dense_c_out == 24][0]
    mm = [layer for layer in prob.layers if layer.spec.op == "MatMul" and layer.dense_c_in == 24]
    stream_readers = [m for m in mm if m.dense_c_out in (72, 48)]  # the QKV projection and the MLP's fc1
    assert conv_in.c_out.terms and len(stream_readers) == 2
    assert all(m.c_in.terms == conv_in.c_out.terms for m in stream_readers)
    proj = [m for m in mm if m.dense_c_out == 24][0]  # reads the 2 heads of 12
    assert proj.c_in.terms[0][1] == 12 and prob.groups[proj.c_in.terms[0][0]].size == 2


def test_prune_streams_option_keeps_the_stream_of_attention_models(tmp_path):
    from latprune.pipeline import prepare

    onnx.save(vit_like(), str(tmp_path / "vit.onnx"))
    _, _, an = prepare(tmp_path / "vit.onnx", step=8, prune_streams="yes")
    stream = an.problem.layers[0].c_out.terms[0][0]
    assert an.problem.groups[stream].prunable
    _, _, kept = prepare(tmp_path / "vit.onnx", step=8)  # auto: attention present -> stream kept
    assert not kept.problem.groups[stream].prunable and any("stream" in n for n in kept.notes)
    # the kept stream's widths are fixed in the spaces the solvers read (as analysis writes
    # groups that were never prunable), so no solver meets a term of a non-prunable group
    assert kept.problem.layers[0].c_out.terms == [] and kept.problem.layers[0].c_out.fixed == 32
    assert all(kept.problem.groups[g].prunable for layer in kept.problem.layers
               for sp in (layer.c_in, layer.c_out) for g, _ in sp.terms)
    assert all(g.prunable for g in _heads(an))


def test_head_importance_and_attention_layer_model():
    from latprune.profiler.layers import layer_model
    from latprune.solver.importance import magnitude_importance

    an = analyse(vit_like())
    magnitude_importance(an.problem, weight_slices(an))
    for h in _heads(an):
        assert len(h.importance) == 4 and min(h.importance) > 0
    att = next(layer for layer in an.problem.layers if layer.spec.op == "Attention")
    model = layer_model(att.spec, 16, 16)  # 2 heads of 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == [1, 2, 17, 8]
    out = sess.run(None, {sess.get_inputs()[0].name: np.zeros((1, 2, 17, 8), np.float32)})[0]
    assert out.shape == (1, 2, 17, 8)


def test_attention_kernels_belong_to_the_attention_layer():
    from latprune.ingraph_profile import layer_names

    an = analyse(bert_like())
    names = layer_names(an.model, an.problem)
    att = [i for i, layer in enumerate(an.problem.layers) if layer.spec.op == "Attention"]
    softmax = [n for n in an.model.graph.node if n.op_type == "Softmax"]
    av = [n for n in an.model.graph.node if n.op_type == "MatMul" and n.input[0] in {s.output[0] for s in softmax}]
    assert [names[s.name] for s in softmax] == att and [names[m.name] for m in av] == att


def test_dynamic_sequence_axis_survives_and_sets_the_table_key(tmp_path):
    """An encoder exported with a dynamic sequence axis: analysed and timed at the sequence
    length asked for (the MatMul and attention keys carry it), pruned with the axis still
    dynamic, and the pruned model runs at other lengths."""
    from latprune.pipeline import OptimizeOptions, optimize

    model = bert_like(tokens=12)
    for inp in model.graph.input:
        inp.type.tensor_type.shape.dim[1].dim_param = "seq"
    for node in model.graph.node:  # Reshape targets with the sequence as 0 (copy) / -1
        if node.op_type == "Reshape":
            init = next(i for i in model.graph.initializer if i.name == node.input[1])
            arr = onnx.numpy_helper.to_array(init).copy()
            arr[1 if len(arr) == 4 and arr[1] == 12 else 3 if len(arr) == 4 else 1] = -1
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(tmp_path / "enc.onnx"))
    an = analyse(model, length=12)
    att = [layer for layer in an.problem.layers if layer.spec.op == "Attention"]
    assert att and att[0].spec.input_hw == [12, 12]
    assert [layer.spec.input_hw for layer in an.problem.layers if layer.spec.op == "MatMul"][0] == [12]
    opts = OptimizeOptions(params_ratio=0.7, lut_path=tmp_path / "lut.sqlite", sequence_length=12, rounds=2,
                           measure_processes=1)
    report = optimize(tmp_path / "enc.onnx", tmp_path / "out", opts)
    assert any("dynamic input axes" in n for n in report["notes"])
    pruned = onnx.load(str(tmp_path / "out" / "pruned.onnx"))
    assert pruned.graph.input[0].type.tensor_type.shape.dim[1].dim_param == "seq"
    feeds = _feeds(bert_like(tokens=12))
    assert _run(pruned, feeds)[0].shape == (1, 12, 32)


def test_uniform_ratio_prunes_heads_too():
    """The uniform baseline and the pipeline's calibration models (uniform 0.75 and 0.5) cut
    heads like any other group: a head group has fewer atoms than the channel step, and the
    step rule once kept all of them at every ratio."""
    from latprune.solver.uniform import uniform_widths

    an = analyse(vit_like(), step=8)
    heads = _heads(an)
    assert heads
    half = uniform_widths(an.problem, 0.5)
    for g in heads:
        assert half[g.id] == 2 and half[g.id] in g.candidate_widths
    assert all(uniform_widths(an.problem, 0.0)[g.id] == 1 for g in heads)
    mlp = [g for g in an.problem.groups if g.prunable and g.size == 128]
    assert mlp and all(half[g.id] == 64 for g in mlp)  # channel groups: multiples of the step
    pruned = apply_plan(an, Plan(kept={gid: list(range(w)) for gid, w in half.items()}))
    assert _run(pruned, _feeds(vit_like()))[0].shape == (1, 10)
