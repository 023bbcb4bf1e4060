"""A teacher scored by a vLLM server (opd_exp/models/teacher_server.py), offline: a fake server in a thread answers
``/v1/models`` and ``/v1/completions`` with vLLM-shaped ``prompt_logprobs`` computed by the local teacher, and the
loop's collect() with the served teacher must give the Batch the local teacher gives."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from pair_factory import write_pair

from opd_exp.config import ModelConfig, TaskConfig, load_run_config
from opd_exp.config.validation import ConfigError
from opd_exp.models.pair import load_pair
from opd_exp.models.teacher_server import ServedTeacher, TeacherServerError, scores_from_prompt_logprobs, unservable
from opd_exp.objectives import ESTIMATORS
from opd_exp.rollout import make_backend
from opd_exp.train.collect import collect
from opd_exp.train.loop import check_served_teacher

MAX_LOGPROBS = 20  # the fake server's --max-logprobs (vLLM's default)


def vllm_prompt_logprobs(teacher, ids: list[int], k: int, vocab_size: int) -> list[dict | None]:
    """What vLLM returns for one prompt: None, then per position its top-k ids and the actual token, with ranks.
    The softmax runs over the tokenizer's ids (a trained checkpoint's padded rows carry ~0 mass)."""
    with torch.no_grad():
        logits = teacher(input_ids=torch.tensor([ids])).logits[0, :, :vocab_size].float()
    logprobs = torch.log_softmax(logits, -1)
    out: list[dict | None] = [None]
    for i in range(1, len(ids)):
        row = logprobs[i - 1]
        entry = {}
        for rank, j in enumerate(row.topk(k).indices.tolist() if k else [], start=1):
            entry[str(j)] = {"logprob": float(row[j]), "rank": rank, "decoded_token": f"<{j}>"}
        token = ids[i]
        entry.setdefault(str(token), {"logprob": float(row[token]), "rank": int((row > row[token]).sum()) + 1,
                                      "decoded_token": f"<{token}>"})
        out.append(entry)
    return out


def fake_vllm(teacher, vocab_size: int, seen: list[dict]):
    """A ThreadingHTTPServer answering as ``vllm serve <teacher> --max-logprobs 20`` does (the parts used)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def reply(self, code: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self.reply(200, {"object": "list", "data": [{"id": "teacher", "object": "model"}]})

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(req)
            if req["prompt_logprobs"] > MAX_LOGPROBS:  # vLLM's _validate_logprobs refusal
                self.reply(400, {"error": {"message": f"Requested prompt logprobs of {req['prompt_logprobs']}, "
                                           f"which is greater than max allowed: {MAX_LOGPROBS}",
                                           "type": "BadRequestError", "code": 400}})
                return
            choices = [{"index": i, "text": "x", "finish_reason": "length",
                        "prompt_logprobs": vllm_prompt_logprobs(teacher, ids, req["prompt_logprobs"], vocab_size)}
                       for i, ids in enumerate(req["prompt"])]
            self.reply(200, {"object": "text_completion", "model": req["model"], "choices": choices})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(local pair, served pair, the requests the server saw); the server stops after the module."""
    dirs = write_pair(tmp_path_factory.mktemp("pair"), "qwen2")
    cfg = ModelConfig(name="t", kind="pretrained", teacher_path=str(dirs["teacher"]),
                      student_path=str(dirs["student"]), dtype="float32")
    local = load_pair(cfg, TaskConfig())
    seen: list[dict] = []
    server = fake_vllm(local.teacher, local.vocab_size, seen)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    served = load_pair(ModelConfig(**{**cfg.__dict__, "teacher_server": url}), TaskConfig())
    served.teacher.rows_per_request = 3  # the step's 8 rows in 3 requests (3 + 3 + 2), concatenated in order
    yield local, served, seen
    server.shutdown()


def run_config(*overrides: str):
    node: dict = {"train": {"mini_batch_size": 8, "prompts_per_step": 2}, "sampling": {"rollouts_per_prompt": 4,
                                                                                        "max_new_tokens": 12}}
    for o in overrides:
        key, value = o.split("=")
        group, name = key.split(".")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:  # a bare string
            parsed = value
        node.setdefault(group, {})[name] = parsed
    return load_run_config(node)


def collected(pair, cfg, estimator: str):
    """collect() as train_step calls it, from a fixed seed (the same rollouts for both pairs)."""
    tok = pair.tokenizer
    prompts = [tok("What is 2 + 3?")["input_ids"], tok("Compute 7 x 6.")["input_ids"]]
    torch.manual_seed(0)
    return collect(pair, prompts, cfg, ESTIMATORS[estimator].needs(cfg.estimator), make_backend("hf"), [],
                   diag_top_k=cfg.train.diag_top_k)


def test_load_pair_keeps_the_served_teacher_off_this_machine(setup):
    _, served, _ = setup
    assert isinstance(served.teacher, ServedTeacher) and served.teacher_tokenizer is served.tokenizer


@pytest.mark.parametrize("estimator, k", [("topk_rkl", 8), ("sampled_token", 0)])
def test_served_scores_equal_the_local_teachers(setup, estimator, k):
    """The Batch's teacher tensors (and the diagnostics' top-K) from the server equal the local teacher's on every
    real response position: sampled-token log q, top-K ids in order, their log q."""
    local, served, seen = setup
    cfg = run_config(f"estimator.name={estimator}", f"estimator.top_k={max(k, 1)}", "train.diag_top_k=4",
                     "eval.teacher=false")
    n_requests = len(seen)
    (want, want_probe), (got, got_probe) = collected(local, cfg, estimator), collected(served, cfg, estimator)
    assert len(seen) - n_requests == 3
    assert torch.equal(got.ids_BT, want.ids_BT)  # the same rollouts
    mask_BT = want.attention_mask_BT
    torch.testing.assert_close(got.teacher.sampled_logprobs_BT[mask_BT], want.teacher.sampled_logprobs_BT[mask_BT],
                               atol=1e-5, rtol=0)
    for g, w in ((got.teacher.topk_ids_BTK, want.teacher.topk_ids_BTK),
                 (got_probe.teacher_topk_ids_BTK, want_probe.teacher_topk_ids_BTK)):
        assert (g is None) == (w is None) and (g is None or torch.equal(g[mask_BT], w[mask_BT]))
    if k:
        assert got.teacher.topk_ids_BTK.shape[-1] == k
        torch.testing.assert_close(got.teacher.topk_logprobs_BTK[mask_BT], want.teacher.topk_logprobs_BTK[mask_BT],
                                   atol=1e-5, rtol=0)
    last = seen[-1]
    assert last["prompt_logprobs"] == max(k, 4) and last["max_tokens"] == 1 and last["temperature"] == 1.0
    assert all(isinstance(i, int) for i in last["prompt"][0])  # token ids, not text


def test_k_above_the_servers_cap_names_the_setting(setup):
    _, served, _ = setup
    ids_BT, mask_BT = torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(TeacherServerError, match=r"greater than max allowed: 20.*--max-logprobs"):
        served.teacher.score(torch.tensor([[3, 4]]), mask_BT, ids_BT, mask_BT, top_k=32, vocab_size=100)


def test_prompt_logprobs_become_topk_tensors():
    """Position len(prompt) + t scores response token t; the top-K is read by log-prob (the sampled token may sit
    outside it, as vLLM adds it with its own rank); fewer than K entries name --max-logprobs."""
    def lp(pairs):
        return {str(i): {"logprob": v, "rank": r} for r, (i, v) in enumerate(pairs, start=1)}
    entries = [[None, lp([(1, -0.1)]), lp([(9, -0.5), (4, -1.0), (7, -3.0)]), lp([(2, -0.2), (3, -2.0)])]]
    ids_BT, mask_BT = torch.tensor([[7, 3, 0]]), torch.tensor([[True, True, False]])
    scores = scores_from_prompt_logprobs(entries, [2], ids_BT, mask_BT, top_k=2, vocab_size=10)
    assert scores.sampled_logprobs_BT.tolist() == [[-3.0, -2.0, 0.0]]
    assert scores.topk_ids_BTK.tolist() == [[[9, 4], [2, 3], [0, 0]]]
    torch.testing.assert_close(scores.topk_logprobs_BTK, torch.tensor([[[-0.5, -1.0], [-0.2, -2.0], [0.0, 0.0]]]))
    with pytest.raises(TeacherServerError, match="--max-logprobs 3"):
        scores_from_prompt_logprobs(entries, [2], ids_BT, mask_BT, top_k=3, vocab_size=10)
    with pytest.raises(TeacherServerError, match="id 9 .* padded embedding row"):
        scores_from_prompt_logprobs(entries, [2], ids_BT, mask_BT, top_k=2, vocab_size=9)


def test_what_a_server_cannot_score_is_refused_before_loading():
    assert unservable(ESTIMATORS["topk_rkl"].needs(run_config().estimator)) is None
    for estimator in ("full_rkl", "seq_kd"):
        with pytest.raises(ConfigError, match=rf"model.teacher_server: got 'http://h:1' with "
                                              rf"estimator.name='{estimator}', which"):
            check_served_teacher(run_config(f"estimator.name={estimator}", "model.teacher_server=http://h:1",
                                            "eval.teacher=false"))
    with pytest.raises(ConfigError, match="eval.teacher: got true with model.teacher_server"):
        run_config("model.teacher_server=http://h:1")
    with pytest.raises(ConfigError, match="model.teacher_server: got 'h:1', allowed: null or an http"):
        run_config("model.teacher_server=h:1", "eval.teacher=false")
