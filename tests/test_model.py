"""Unit tests for distnmt.model: RNNsearch / RNNencdec and greedy / beam search.

All models are tiny (vocab 30, embeddings 8, hidden 16) so the file runs in seconds.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distnmt.config import load_config
from distnmt.data import read_lines
from distnmt.model import PaperGRUCell, RNNSearch, beam_search, greedy_search
from distnmt.model.build import build_model

REPO = Path(__file__).resolve().parents[1]

PAD, BOS, EOS = 0, 1, 2
V = 30
TINY = dict(embed_size=8, hidden_size=16, align_size=12, maxout_size=10)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a busy machine its
    OpenMP spin-waits made the overfit test 20x slower (85 s instead of 4 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed: int = 0, **kwargs) -> RNNSearch:
    torch.manual_seed(seed)
    return RNNSearch(V, V, **{**TINY, **kwargs}).eval()


def padded(seqs: list[list[int]], pad: int = PAD) -> tuple[Tensor, Tensor]:
    """Right-pad token lists into [B, max_len] plus their lengths."""
    lengths = torch.tensor([len(s) for s in seqs])
    out = torch.full((len(seqs), int(lengths.max())), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
    return out, lengths


def random_batch(seed: int, src_lens: list[int]) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return padded([torch.randint(3, V, (n,), generator=g).tolist() for n in src_lens])


def peaky_model(seed: int = 0, attention: bool = True, eos_bias: float = 2.0) -> RNNSearch:
    """A random model with sharper distributions and a likelier EOS, so that
    hypotheses end at different lengths (a tiny fresh model is near uniform)."""
    model = tiny_model(seed, init="torch", attention=attention)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3**0.5)
        model.output.bias[EOS] += eos_bias
    return model


# --------------------------------------------------------------------- model


@pytest.mark.parametrize("gru", ["cudnn", "paper"])
@pytest.mark.parametrize("attention", [True, False])
def test_padding_does_not_change_log_probs(gru: str, attention: bool) -> None:
    model = tiny_model(gru=gru, attention=attention)
    src, src_len = random_batch(1, [7, 3, 5])
    tgt, _ = padded([[BOS, 5, 6, 7], [BOS, 8, 9], [BOS, 4]])
    batch = F.log_softmax(model(src, src_len, tgt), dim=-1)
    for i, (n, m) in enumerate([(7, 4), (3, 3), (5, 2)]):
        alone = F.log_softmax(model(src[i : i + 1, :n], src_len[i : i + 1], tgt[i : i + 1, :m]), -1)
        torch.testing.assert_close(batch[i : i + 1, :m], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gru", ["cudnn", "paper"])
def test_decode_step_matches_teacher_forced_forward(gru: str) -> None:
    model = tiny_model(gru=gru)
    src, src_len = random_batch(2, [6, 4])
    tgt = torch.tensor([[BOS, 5, 6, 7, 8], [BOS, 9, 10, 11, 12]])
    full = F.log_softmax(model(src, src_len, tgt), dim=-1)
    enc = model.encode(src, src_len)
    state = model.init_decoder_state(enc)
    for i in range(tgt.size(1)):
        log_probs, state, _ = model.decode_step(enc, tgt[:, i], state)
        assert log_probs.dtype == torch.float32
        torch.testing.assert_close(log_probs, full[:, i], atol=1e-5, rtol=1e-5)


def test_attention_sums_to_one_and_is_zero_on_padding() -> None:
    model = tiny_model()
    src, src_len = random_batch(3, [6, 2, 4])
    enc = model.encode(src, src_len)
    assert enc.mask.tolist() == [[True] * 6, [True] * 2 + [False] * 4, [True] * 4 + [False] * 2]
    state = model.init_decoder_state(enc)
    prev = torch.full((3,), BOS)
    for _ in range(3):
        _, state, weights = model.decode_step(enc, prev, state)
        assert weights.shape == (3, 6)
        torch.testing.assert_close(weights.sum(-1), torch.ones(3))
        assert torch.all(weights[~enc.mask] == 0)
        assert torch.all(weights[enc.mask] > 0)
        prev = torch.tensor([5, 6, 7])


def test_encoder_output_shapes_and_index_select() -> None:
    model = tiny_model()
    src, src_len = random_batch(4, [5, 3])
    enc = model.encode(src, src_len)
    assert enc.annotations.shape == (2, 5, 32)
    assert enc.keys is not None and enc.keys.shape == (2, 5, 12)
    assert enc.init_state.shape == (2, 16)
    # s_0 = tanh(W_s bwd_1): the backward half of the first annotation.
    torch.testing.assert_close(
        enc.init_state, torch.tanh(model.init_proj(enc.annotations[:, 0, 16:]))
    )
    # Padding annotations are zero (packed GRU never reads or writes them).
    assert torch.all(enc.annotations[1, 3:] == 0)
    picked = enc.index_select(torch.tensor([1, 1, 0]))
    assert torch.equal(picked.annotations[2], enc.annotations[0])
    assert torch.equal(picked.mask[0], enc.mask[1]) and picked.keys.shape == (3, 5, 12)


# Short real pairs of newstest2013 (1-based line numbers), word-level: small enough to
# overfit in seconds, real enough to have repeated words ("The", "de") and punctuation.
OVERFIT_LINES = (73, 104, 123, 158)


def word_ids(sentences: list[str], first_id: int = 3) -> list[list[int]]:
    """Whitespace tokens -> ids from ``first_id`` (0-2 are PAD, BOS, EOS), in order of appearance."""
    vocab: dict[str, int] = {}
    return [[vocab.setdefault(w, first_id + len(vocab)) for w in s.split()] for s in sentences]


def test_overfit_a_few_real_pairs(shared_data: Path) -> None:
    en = read_lines(shared_data / "dev/newstest2013.en")
    fr = read_lines(shared_data / "dev/newstest2013.fr")
    sources = word_ids([en[n - 1] for n in OVERFIT_LINES])
    targets = word_ids([fr[n - 1] for n in OVERFIT_LINES])
    assert fr[103] == "Le boson de Higgs décortiqué"
    assert targets[1][0] == targets[3][0]  # "Le", shared by two sentences
    v_src = max(max(s) for s in sources) + 1
    v_tgt = max(max(t) for t in targets) + 1
    torch.manual_seed(0)
    model = RNNSearch(v_src, v_tgt, embed_size=16, hidden_size=32, align_size=16, maxout_size=16)
    src, src_len = padded(sources)
    tgt_in, _ = padded([[BOS] + t for t in targets])
    tgt_out, _ = padded([t + [EOS] for t in targets])
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for _ in range(150):
        logits = model(src, src_len, tgt_in)
        loss = F.cross_entropy(logits.reshape(-1, v_tgt), tgt_out.reshape(-1), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.02
    model.eval()
    assert greedy_search(model, src, src_len, BOS, EOS) == targets
    assert beam_search(model, src, src_len, BOS, EOS, beam_size=3) == targets


def test_keys_are_computed_once_per_batch() -> None:
    """U_a h_j runs once per batch (in encode), W_a s_{i-1} once per step."""
    model = tiny_model()
    calls = {"key_proj": 0, "query_proj": 0}
    for name in calls:
        getattr(model, name).register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    src, src_len = random_batch(8, [5, 3])
    model(src, src_len, torch.tensor([[BOS, 5, 6, 7], [BOS, 8, 9, PAD]]))
    assert calls == {"key_proj": 1, "query_proj": 4}
    beam_search(model, src, src_len, BOS, EOS, beam_size=3, max_len_a=0, max_len_b=6)
    assert calls["key_proj"] == 2  # one more batch: one more call, whatever the steps and beams


# ------------------------------------------------------------ configuration


def expected_param_count(
    vs: int, vt: int, e: int, h: int, a: int, m: int, attention: bool, gru: str
) -> int:
    """Parameter count from the paper's formulas (biases as laid out in rnnsearch.py)."""
    ctx = 2 * h
    n = vs * e + vt * e  # embeddings
    if gru == "cudnn":
        n += 2 * (3 * h * e + 3 * h * h + 2 * 3 * h)  # bidirectional nn.GRU, 2 biases per gate
    else:
        n += 2 * (3 * h * e + 3 * h + 3 * h * h)  # two paper cells, 1 bias per gate
    n += h * h + h  # W_s (s_0 = tanh(W_s bwd_1))
    if attention:
        n += a * h + (a * ctx + a) + a  # W_a, U_a and b_a, v_a
    if gru == "cudnn":
        n += 3 * h * (e + ctx) + 3 * h * h + 2 * 3 * h  # nn.GRUCell
    else:
        n += 3 * h * (e + ctx) + 3 * h + 2 * h * h + h * h  # W, C (+b); U_z, U_r; U
    n += (h + e + ctx) * 2 * m + 2 * m  # U_o, V_o, C_o and bias (before maxout)
    n += m * vt + vt  # W_o
    return n


def encdec_param_count(vs: int, vt: int, e: int, h: int, m: int, gru: str) -> int:
    """RNNencdec (Cho et al. 2014a): unidirectional encoder, c = tanh(V h_T), s_0 = tanh(V' c), c of size h."""
    gru_params = (lambda inp: 3 * h * inp + 3 * h * h + 2 * 3 * h) if gru == "cudnn" else (lambda inp: 3 * h * inp + 3 * h + 3 * h * h)
    n = vs * e + vt * e + gru_params(e)  # embeddings, encoder
    n += 2 * (h * h + h)  # V and V'
    n += gru_params(e + h)  # decoder cell over [E y; c]
    n += (h + e + h) * 2 * m + 2 * m + m * vt + vt  # deep output, W_o
    return n


def tied_param_count(untied: int, vt: int, e: int, m: int) -> int:
    """Tied: W_o's matrix is E (only its bias is new), plus the maxout->embed projection."""
    return untied - m * vt + (m * e if m != e else 0)


@pytest.mark.parametrize("gru", ["cudnn", "paper"])
@pytest.mark.parametrize("attention", [True, False])
def test_paper_config_parameter_count_and_shapes(gru: str, attention: bool) -> None:
    with torch.device("meta"):  # shapes only: no 80M-parameter allocation
        model = RNNSearch(30000, 30000, 620, 1000, 1000, 500, attention, gru, init="torch")
    n = sum(p.numel() for p in model.parameters())
    assert n == expected_param_count(30000, 30000, 620, 1000, 1000, 500, attention, gru)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes["src_embed.weight"] == (30000, 620)
    if gru == "cudnn":
        assert shapes["encoder.weight_hh_l0_reverse"] == (3000, 1000)
    else:
        assert shapes["encoder.bwd.input_proj.weight"] == (3000, 620)
        assert shapes["encoder.bwd.gate_proj.weight"] == (2000, 1000)
    assert shapes["pre_output.weight"] == (1000, 1000 + 620 + 2000)
    assert shapes["output.weight"] == (30000, 500)
    if attention:
        assert shapes["query_proj.weight"] == (1000, 1000)
        assert shapes["key_proj.weight"] == (1000, 2000)
        assert shapes["energy.weight"] == (1, 1000)
    if gru == "paper":
        assert shapes["cell.candidate_proj.weight"] == (1000, 1000)


PAPER_CONFIGS = {
    "rnnsearch-50.yaml": ("rnnsearch", 50),
    "rnnsearch-30.yaml": ("rnnsearch", 30),
    "rnnencdec-50.yaml": ("rnnencdec", 50),
    "rnnencdec-30.yaml": ("rnnencdec", 30),
}


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_configs_build_the_paper_models(name: str) -> None:
    cfg = load_config(REPO / "configs" / name)
    arch, words = PAPER_CONFIGS[name]
    m = cfg.model
    assert (m.arch, cfg.data.max_words, cfg.data.vocab_size) == (arch, words, 30000)
    assert (m.embed_size, m.hidden_size, m.align_size, m.maxout_size) == (620, 1000, 1000, 500)
    assert (m.init, m.dropout, m.tie_embeddings) == ("paper", 0.0, False)  # the paper's, no extras
    assert (cfg.optim.name, cfg.optim.eps, cfg.optim.rho, cfg.optim.clip_norm) == ("adadelta", 1e-6, 0.95, 1.0)
    assert cfg.train.batch_sentences == 80  # the paper's minibatch, per update
    with torch.device("meta"):
        model = build_model(m, 30000, 30000)
    n = sum(p.numel() for p in model.parameters())
    if arch == "rnnsearch":
        assert n == expected_param_count(30000, 30000, 620, 1000, 1000, 500, True, m.gru)
    else:
        assert n == encdec_param_count(30000, 30000, 620, 1000, 500, m.gru)
    if name == "rnnsearch-50.yaml":
        assert m.gru == "paper" and n == 80_443_000  # the figure docs/MODEL.md gives


@pytest.mark.parametrize("gru", ["cudnn", "paper"])
def test_rnnencdec_has_no_attention_parameters(gru: str) -> None:
    model = tiny_model(attention=False, gru=gru)
    names = [name for name, _ in model.named_parameters()]
    assert not any(k in name for name in names for k in ("query_proj", "key_proj", "energy"))
    src, src_len = random_batch(5, [4, 2])
    enc = model.encode(src, src_len)
    assert enc.keys is None and enc.context is not None and enc.context.shape == (2, 32)
    # c = [fwd at the last word; bwd at the first word]
    torch.testing.assert_close(enc.context[1, :16], enc.annotations[1, 1, :16])
    torch.testing.assert_close(enc.context[:, 16:], enc.annotations[:, 0, 16:])
    _, _, weights = model.decode_step(enc, torch.tensor([BOS, BOS]), enc.init_state)
    assert torch.all(weights == 0)


def test_paper_init() -> None:
    model = tiny_model(gru="paper", init="paper")
    assert torch.all(model.energy.weight == 0)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert torch.all(p == 0), name
    recurrent = [model.encoder.fwd.gate_proj.weight, model.encoder.bwd.candidate_proj.weight,
                 model.cell.gate_proj.weight, tiny_model(gru="cudnn").encoder.weight_hh_l0_reverse]
    for block in [b for w in recurrent for b in w.split(16)]:
        torch.testing.assert_close(block @ block.T, torch.eye(16), atol=1e-5, rtol=0)
    assert model.query_proj.weight.std().item() == pytest.approx(0.001, rel=0.3)
    assert model.output.weight.std().item() == pytest.approx(0.01, rel=0.3)
    assert torch.all(model.src_embed.weight[PAD] == 0)
    assert torch.all(model.tgt_embed.weight[PAD] == 0)


@pytest.mark.parametrize("maxout", [8, 10])  # 8 = embed_size: no projection needed
def test_tied_embeddings_share_the_target_embedding(maxout: int) -> None:
    untied = tiny_model(maxout_size=maxout)
    tied = tiny_model(maxout_size=maxout, tie_embeddings=True)
    assert tied.output.weight is tied.tgt_embed.weight
    assert (tied.output_proj is None) == (maxout == 8)
    n_untied = sum(p.numel() for p in untied.parameters())
    n_tied = sum(p.numel() for p in tied.parameters())
    assert n_tied == tied_param_count(n_untied, V, 8, maxout)
    # The paper init does not leave the shared matrix at the output layer's 0.01 twice
    # over, and the padding row is zero where it is shared too.
    assert torch.all(tied.output.weight[PAD] == 0)
    src, src_len = random_batch(9, [5, 3])
    tgt = torch.tensor([[BOS, 5, 6], [BOS, 7, PAD]])
    logits = tied(src, src_len, tgt)
    assert logits.shape == (2, 3, V)
    logits[0, 1, 4].backward()
    # The shared matrix gets gradient from the output layer (row 4) and the input (row 5).
    grad = tied.tgt_embed.weight.grad
    assert grad is not None and grad[4].abs().sum() > 0 and grad[5].abs().sum() > 0
    # Decoding works the same way.
    assert len(greedy_search(tied.eval(), src, src_len, BOS, EOS, 0, 3)) == 2


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="model.gru"):
        RNNSearch(V, V, **TINY, gru="lstm")
    with pytest.raises(ValueError, match="model.init"):
        RNNSearch(V, V, **TINY, init="xavier")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])  # fp16: CPU autocast has it too
def test_bf16_autocast_forward_returns_float32(dtype: torch.dtype) -> None:
    model = tiny_model(init="torch")
    src, src_len = random_batch(6, [5, 3])
    tgt = torch.tensor([[BOS, 5, 6], [BOS, 7, PAD]])
    ref = model(src, src_len, tgt)
    with torch.autocast(device_type="cpu", dtype=dtype):
        logits = model(src, src_len, tgt)
    assert logits.dtype == torch.float32 and logits.shape == (2, 3, V)
    torch.testing.assert_close(logits, ref, atol=0.1, rtol=0.1)
    logits.sum().backward()  # the backward pass works too
    assert model.output.weight.grad is not None


@pytest.mark.parametrize("gru", ["cudnn", "paper"])
def test_bf16_autocast_decoding_keeps_fp32_probabilities_and_state(gru: str) -> None:
    model = tiny_model(init="torch", gru=gru)
    src, src_len = random_batch(6, [5, 3])
    with torch.inference_mode(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        enc = model.encode(src, src_len)
        assert enc.annotations.dtype == torch.bfloat16  # cast once for every step's bmm
        log_probs, state, weights = model.decode_step(enc, torch.tensor([BOS, BOS]), enc.init_state)
        hyps = beam_search(model, src, src_len, BOS, EOS, beam_size=2, max_len_a=0, max_len_b=4)
    assert log_probs.dtype == state.dtype == weights.dtype == torch.float32
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(2))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    assert len(hyps) == 2


# ---------------------------------------------------------------- GRU cells


def test_paper_gru_cell_matches_the_paper_formula_and_differs_from_cudnn() -> None:
    torch.manual_seed(0)
    n_in, h = 5, 4
    cell = PaperGRUCell(n_in, h)
    x, s = torch.randn(3, n_in), torch.randn(3, h)
    W, b = cell.input_proj.weight, cell.input_proj.bias
    W_z, W_r, W_n = W.split(h)
    b_z, b_r, b_n = b.split(h)
    U_z, U_r = cell.gate_proj.weight.split(h)
    U = cell.candidate_proj.weight
    z = torch.sigmoid(x @ W_z.T + s @ U_z.T + b_z)
    r = torch.sigmoid(x @ W_r.T + s @ U_r.T + b_r)
    s_tilde = torch.tanh(x @ W_n.T + (r * s) @ U.T + b_n)  # reset before U
    expected = (1 - z) * s + z * s_tilde
    torch.testing.assert_close(cell(x, s), expected)

    # nn.GRUCell with the same matrices: rows [r; z; n], new state (1-z')*n + z'*s, so
    # z' = 1 - z, i.e. negate the update gate's weights. Only r's placement differs.
    torch_cell = nn.GRUCell(n_in, h)
    with torch.no_grad():
        torch_cell.weight_ih.copy_(torch.cat([W_r, -W_z, W_n]))
        torch_cell.weight_hh.copy_(torch.cat([U_r, -U_z, U]))
        torch_cell.bias_ih.copy_(torch.cat([b_r, -b_z, b_n]))
        torch_cell.bias_hh.zero_()
    assert not torch.allclose(torch_cell(x, s), expected, atol=1e-3)
    cudnn_formula = (1 - z) * s + z * torch.tanh(x @ W_n.T + r * (s @ U.T) + b_n)
    torch.testing.assert_close(torch_cell(x, s), cudnn_formula)
    # With the reset gate fully open (r = 1) the two cells agree.
    with torch.no_grad():
        cell.input_proj.bias[h : 2 * h] = 100.0
        torch_cell.bias_ih[:h] = 100.0
    torch.testing.assert_close(torch_cell(x, s), cell(x, s))


def test_paper_encoder_runs_the_paper_cell_each_way() -> None:
    """Annotations of the paper encoder: the paper cell forward over the words, and
    backward from each sentence's own last word (padding never read)."""
    model = tiny_model(gru="paper")
    src, src_len = random_batch(10, [5, 3])
    enc = model.encode(src, src_len)
    for b, n in enumerate(src_len.tolist()):
        emb = model.src_embed(src[b, :n])
        cells = {"fwd": model.encoder.fwd, "bwd": model.encoder.bwd}
        for half, (name, order) in enumerate((("fwd", range(n)), ("bwd", range(n - 1, -1, -1)))):
            state = torch.zeros(1, 16)
            for t in order:
                state = cells[name](emb[t : t + 1], state)
                torch.testing.assert_close(enc.annotations[b, t, 16 * half : 16 * (half + 1)], state[0])
        assert torch.all(enc.annotations[b, n:] == 0)
    # s_0 = tanh(W_s bwd_1), from the backward half of the first annotation.
    torch.testing.assert_close(enc.init_state, torch.tanh(model.init_proj(enc.annotations[:, 0, 16:])))


# ------------------------------------------------------------------- search


def test_beam_size_one_equals_greedy() -> None:
    model = peaky_model()
    src_lens = [7, 3, 1, 5, 6, 2]
    src, src_len = random_batch(0, src_lens)
    greedy = greedy_search(model, src, src_len, BOS, EOS, max_len_a=1.5, max_len_b=3)
    limits = [int(1.5 * n + 3) for n in src_lens]
    lengths = [len(h) for h in greedy]
    # The fixture exercises both endings: EOS before the limit, and the limit itself.
    assert any(n < lim for n, lim in zip(lengths, limits))
    assert any(n == lim for n, lim in zip(lengths, limits))
    for alpha in (0.0, 1.0):
        beam = beam_search(model, src, src_len, BOS, EOS, beam_size=1, alpha=alpha, max_len_b=3)
        assert beam == greedy


@pytest.mark.parametrize("attention,eos_bias", [(True, 2.0), (False, 1.0)])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_batched_beam_search_equals_sentence_by_sentence(
    attention: bool, eos_bias: float, alpha: float
) -> None:
    model = peaky_model(seed=1, attention=attention, eos_bias=eos_bias)
    src_lens = [7, 3, 1, 5, 6, 2]
    src, src_len = random_batch(0, src_lens)
    kw = dict(beam_size=4, alpha=alpha, max_len_b=3, return_attention=True)
    hyps, attns = beam_search(model, src, src_len, BOS, EOS, **kw)
    # Sentences finish at different steps, so the batch shrinks while decoding.
    assert len({len(h) for h in hyps}) > 1
    for i, n in enumerate(src_lens):
        one, one_attn = beam_search(model, src[i : i + 1, :n], src_len[i : i + 1], BOS, EOS, **kw)
        assert one == [hyps[i]]
        rows = len(hyps[i]) + (len(hyps[i]) < int(1.5 * n + 3))  # + the EOS row
        assert attns[i].shape == (rows, n)
        torch.testing.assert_close(one_attn[0], attns[i], atol=1e-5, rtol=1e-5)
        if attention:
            torch.testing.assert_close(attns[i].sum(-1), torch.ones(rows))


def exhaustive_best(model: RNNSearch, src: Tensor, src_len: Tensor, limit: int) -> list[int]:
    """The highest sum-log-prob output (alpha=0) by scoring every possible one."""
    enc = model.encode(src, src_len)
    best, best_score = None, float("-inf")
    non_eos = [t for t in range(model.tgt_vocab_size) if t != EOS]
    for k in range(limit + 1):
        for seq in itertools.product(non_eos, repeat=k):
            ended = k < limit
            full = list(seq) + ([EOS] if ended else [])
            state, prev, score = enc.init_state, torch.tensor([BOS]), 0.0
            for tok in full:
                log_probs, state, _ = model.decode_step(enc, prev, state)
                score += log_probs[0, tok].item()
                prev = torch.tensor([tok])
            if score > best_score:
                best, best_score = list(seq), score
    assert best is not None
    return best


def test_wide_beam_finds_the_exact_best_output() -> None:
    limit = 3  # 4^3 + 4^2 + 4 + 1 = 85 possible outputs with 4 non-EOS target ids
    beats_greedy = 0
    for seed, scale in itertools.product(range(6), (2.0, 3.0)):
        torch.manual_seed(seed)
        model = RNNSearch(V, 5, **TINY, init="torch").eval()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
        src, src_len = random_batch(7, [4])
        with torch.inference_mode():
            expected = exhaustive_best(model, src, src_len, limit)
        kw = dict(alpha=0.0, max_len_a=0, max_len_b=limit)
        # 64 beams hold every live prefix (at most 4^2 before the last step).
        assert beam_search(model, src, src_len, BOS, EOS, beam_size=64, **kw) == [expected]
        beats_greedy += greedy_search(model, src, src_len, BOS, EOS, 0, limit) != [expected]
    assert beats_greedy > 0  # the check is not one that greedy search passes too


def test_beam_size_must_be_positive() -> None:
    model = tiny_model()
    src, src_len = random_batch(0, [3])
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, src, src_len, BOS, EOS, beam_size=0)
