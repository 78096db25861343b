"""Rollout plumbing: the reward side's token ids, padding into a Rollout, verifiable prompts, probe pairs."""
from __future__ import annotations

import random

import torch

from train.data.chat import Message
from train.data.preference import DEFAULT_CONDITIONS, PreferencePair, conditioned, reward_token_id, score_ids
from train.data.tokenizer import ByteTokenizer
from train.rlhf.probe_pairs import mislabelled_pairs, padded, probe_pairs, wrong
from train.rlhf.rollouts import Generated, Prompt, SyntheticPrompts, build_rollout, response_text, reward_ids

TOK = ByteTokenizer(272)


def test_reward_ids_equal_the_reward_stages_for_a_wellformed_reply():
    prompts = SyntheticPrompts(0, "t", ["arithmetic", "calculator", "system"], "concise").take(0, 6)
    rid = reward_token_id(TOK)
    for p in prompts:
        pair = PreferencePair(p.domain, p.messages, (Message("assistant", p.answer),), (Message("assistant", "x"),))
        want = score_ids(conditioned(pair, pair.chosen, DEFAULT_CONDITIONS), TOK, rid)
        assert reward_ids(TOK, p, p.answer, DEFAULT_CONDITIONS, rid) == want
        assert reward_ids(TOK, p, p.answer, {}, rid) == score_ids(conditioned(pair, pair.chosen, {}), TOK, rid)
    # A malformed reply (a stray turn marker) is still scored instead of refused.
    ids = reward_ids(TOK, prompts[0], "7<|im_start|>user", DEFAULT_CONDITIONS, rid)
    assert ids[-1] == rid and TOK.special_ids["<|im_start|>"] in ids


def test_prompts_checker_and_response_text():
    p = SyntheticPrompts(1, "t", ["arithmetic"], "concise")[3]
    assert p.messages[-1].role == "user" and p.check(p.answer) and p.check(f" {p.answer}\n")
    assert not p.check(p.answer + "0")
    stop = (TOK.special_ids["<|im_end|>"], TOK.eos_id)
    assert response_text(TOK, TOK.encode("42") + [stop[0]], stop) == "42"
    assert response_text(TOK, TOK.encode("42"), stop) == "42"           # cut by the length limit
    assert Prompt("a", "t", "d", (), "").check("anything") is None


def test_build_rollout_layout():
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 10]]
    replies = [[11, 12], [13, 14, 15], []]
    logps = [[-0.5, -0.25], [-1.0, -2.0, -3.0], []]
    ro = build_rollout(prompts, replies, torch.tensor([1.0, 2.0, 3.0]), 2, torch.device("cpu"), logps)
    assert ro.input_ids.tolist() == [[1, 5, 6, 11, 12], [1, 7, 13, 14, 15], [1, 8, 9, 10, 2]]
    assert ro.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # action t = token t+1: row 0's replies are tokens 3 and 4 -> actions 2 and 3
    assert ro.action_mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]]
    assert ro.sampler_logprobs.tolist() == [[0, 0, -0.5, -0.25], [0, -1.0, -2.0, -3.0], [0, 0, 0, 0]]
    sub = ro.rows(torch.tensor([1]))
    assert sub.sampler_logprobs.tolist() == [[0, -1.0, -2.0, -3.0]] and sub.scores.tolist() == [2.0]


def test_probe_and_hackable_pairs():
    rng = random.Random(0)
    assert wrong(rng, "41") in ("40", "42") and wrong(rng, "abc") != "abc"
    assert padded(rng, "7").startswith("7 ") and len(padded(rng, "7")) > 4
    prompts = SyntheticPrompts(0, "t", ["arithmetic", "system"], "concise").take(0, 4)
    # The hackable RM's pairs: each distinct wrong sampled reply chosen over its prompt's answer; right replies and
    # repeats of a wrong one give none.
    def batch(texts):
        return Generated(prompts, [[0]] * 4, [[1]] * 4, [[0.0]] * 4, texts, [p.check(t) for p, t in zip(prompts, texts)],
                         torch.zeros(4))
    first = batch([prompts[0].answer, "nope", prompts[2].answer + "x", "nope"])
    second = batch(["nope", "nope", prompts[2].answer, "other"])
    pairs = mislabelled_pairs([first, second])
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("nope", prompts[1].answer), (prompts[2].answer + "x", prompts[2].answer), ("nope", prompts[3].answer),
        ("nope", prompts[0].answer), ("other", prompts[3].answer)]
    assert all(p["prompt"] == prompts[i].message_dicts() and p["source"] == "demo:mislabelled"
               for p, i in zip(pairs, [1, 2, 3, 0, 3]))
    assert mislabelled_pairs([batch([p.answer for p in prompts])]) == []
    probes = probe_pairs(prompts, 0)
    assert {p["set"] for p in probes} == {"correct>wrong", "short>padded"}
    assert all(p["chosen"] == prompts[i // 2].answer for i, p in enumerate(probes))


def test_score_runs_the_agreed_number_of_chunks():
    """Data-parallel ranks score their own replies with a (possibly sharded, so collective) reward model: ``agree``
    makes a rank with fewer token-budget chunks run as many forwards as the others; the scores do not change (each
    sequence is its own packed document: fp32 rounding of other groupings only)."""
    from models import InternLM2Config
    from models.internlm2 import InternLM2ForScore
    from train.rlhf.rollouts import score

    torch.manual_seed(0)
    rm = InternLM2ForScore(InternLM2Config.preset("micro"))
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 100, (int(n),), generator=gen).tolist() for n in torch.randint(2, 9, (5,), generator=gen)]
    calls = []
    rm.register_forward_hook(lambda module, args, out: calls.append(len(out.scores)))
    with torch.no_grad():
        want = score(rm, seqs, torch.device("cpu"))
        assert calls == [5]                                   # one chunk within the token budget
        got = score(rm, seqs, torch.device("cpu"), agree=lambda chunks: 3)
        assert calls[1:] == [1, 2, 2]                         # 3 chunks of nearly equal counts, in order
        kept = score(rm, seqs, torch.device("cpu"), batch_tokens=10, agree=lambda chunks: 1)
    assert len(calls) > 5                                     # more local chunks than agreed: kept as they are
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kept, want, rtol=1e-5, atol=1e-6)


def test_rollout_adds_the_checkers_verdict_to_the_reward_models_score():
    """PPO's reward is the RM's score plus checker_weight x (+1 right, -1 wrong, 0 without a checker); the batch's
    own scores (what evaluations and the hacking rules read) stay the reward model's."""
    prompts = SyntheticPrompts(0, "t", ["arithmetic", "system"], "concise").take(0, 2)
    prompts.append(Prompt("free", "t", "concise", prompts[0].messages, ""))     # no checker
    texts = [prompts[0].answer, "wrong", "anything"]
    correct = [p.check(t) for p, t in zip(prompts, texts)]
    assert correct == [True, False, None]
    rm = torch.tensor([0.5, 1.5, -2.0])
    gen = Generated(prompts, [[1, 5], [1, 6, 7], [1]], [[9], [10, 11], [12]], [[-0.1], [-0.2, -0.3], [-0.4]],
                    texts, correct, rm)
    cpu = torch.device("cpu")
    torch.testing.assert_close(gen.rollout(0, cpu, 0.75).scores, torch.tensor([1.25, 0.75, -2.0]))
    torch.testing.assert_close(gen.rollout(0, cpu).scores, rm)
    assert gen.scores.tolist() == [0.5, 1.5, -2.0] and [s.reward for s in gen.samples()] == [0.5, 1.5, -2.0]


def test_sampler_decodes_the_prompts_together_each_from_its_own_generator():
    """PPO's sampling: one batched engine call, every prompt drawing from its own generator, gives each prompt the
    reply (and log-probs) it gets alone, so a data-parallel rank's share samples what one process samples."""
    from models import InternLM2Config, InternLM2ForCausalLM
    from train.rlhf.rollouts import Sampler

    torch.manual_seed(0)
    actor = InternLM2ForCausalLM(InternLM2Config.preset("micro")).eval()
    prompts, seeds = [[5, 17, 3], [9], [4, 4, 8, 15, 16, 23], [2, 99]], [21, 22, 23, 24]
    kw = dict(max_new_tokens=6, temperature=1.0, top_p=0.9, stop_ids=())
    sampler = Sampler(actor, max_batch=4)
    alone = [sampler([p], generators=[torch.Generator().manual_seed(s)], **kw)[0] for p, s in zip(prompts, seeds)]
    engine, produced = sampler.engine, []
    real_step = engine.step

    def step():
        out = real_step()
        produced.append(len(out))                         # requests that got a token in this step
        return out

    engine.step = step
    together = sampler(prompts, generators=[torch.Generator().manual_seed(s) for s in seeds], **kw)
    assert sampler.engine is engine and max(produced) == len(prompts) and len(produced) <= 6
    assert [c.tokens for c in together] == [c.tokens for c in alone]
    for t, a in zip(together, alone):
        # the same float32 logits up to the batch's summation order: ~1e-6 in a log-softmax
        torch.testing.assert_close(torch.tensor(t.logprobs), torch.tensor(a.logprobs), rtol=1e-5, atol=1e-5)
    assert len({tuple(c.tokens) for c in sampler([prompts[0]] * 4, generators=[torch.Generator().manual_seed(s)
                                                                                for s in seeds], **kw)}) > 1
