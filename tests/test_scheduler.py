"""The batching scheduler: rows joining and leaving a running batch decode exactly what each prompt decodes
alone (oracle: `SparseVLM.generate` without a KV cache, one prompt at a time), with and without pruning
inside the LLM; per-request sampling, stop strings and early exit."""

import threading
import pytest
import torch

from sparsevl.eval.run import load_for_inference
from sparsevl.model.pruning import build_pruning_plan, pruning_arguments
from sparsevl.serve.answer_text import AnswerText
from sparsevl.serve.decode_rows import DecodeRows
from sparsevl.serve.sampling import SamplingParams, next_token, top_p_filter
from sparsevl.serve.scheduler import Delta, Finished, GenerationRequest, QueueFull, Scheduler

PLANS = {"none": None, "fastv": dict(token_pruner="fastv", fastv_k=1, fastv_ratio=0.25),
         "sparsevlm": dict(token_pruner="sparsevlm", pruning_layers="0,1", retained_tokens="32,8",
                           sparsevlm_recycling="off")}


def plan_args(token_pruner: str, **values):
    return pruning_arguments(token_pruner, **values)


@pytest.fixture(scope="module")
def loaded(lively_checkpoint):
    return load_for_inference(lively_checkpoint)


@pytest.fixture(scope="module")
def prompts(loaded, shapes_dir):
    """(input_ids, pixel_values) of six questions of different lengths about different images."""
    from PIL import Image

    from sparsevl.data.conversation import prompt_ids

    _, tokenizer, processor = loaded
    questions = ["what colour is the circle?", "how many shapes are there?", "is there a red square in the image?",
                 "where is the triangle?", "what shape is at the top left of the picture?", "count"]
    out = []
    for i, question in enumerate(questions):
        image = Image.open(shapes_dir / "images" / "test" / f"{i:06d}.png").convert("RGB")
        out.append((prompt_ids("<image>\n" + question, tokenizer),
                    processor(images=[image], return_tensors="pt")["pixel_values"]))
    return out


def alone(model, tokenizer, ids, pixels, max_new_tokens):
    """Oracle: the prompt decoded by itself without a KV cache (the whole sequence re-run each step)."""
    return model.generate(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), pixels,
                          max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, use_cache=False)[0]


def set_plan(model, name):
    model.pruning = None if PLANS[name] is None else build_pruning_plan(plan_args(**PLANS[name]), model)


@pytest.mark.parametrize("plan", list(PLANS))
def test_rows_joining_and_leaving_decode_as_each_prompt_alone(loaded, prompts, plan, single_thread):
    model, tokenizer, _ = loaded
    set_plan(model, plan)
    try:
        expected = [alone(model, tokenizer, ids, pixels, 8) for ids, pixels in prompts]

        def prefill(chosen):
            ids = torch.zeros(len(chosen), max(len(prompts[i][0]) for i in chosen), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(chosen):
                ids[row, : len(prompts[i][0])], mask[row, : len(prompts[i][0])] = torch.tensor(prompts[i][0]), 1
            return DecodeRows.prefill(model, ids, mask, torch.cat([prompts[i][1] for i in chosen]))

        rows, logits, _ = prefill([0, 1])
        order, produced = [0, 1], {i: [] for i in range(len(prompts))}
        for step in range(20):
            if step == 2:  # two prompts join a batch that is two tokens in
                new_rows, new_logits, _ = prefill([4, 2])
                rows.extend(new_rows)
                logits, order = torch.cat([logits, new_logits]), order + [4, 2]
            if step == 5:  # and two more later, one of them longer than all running rows
                new_rows, new_logits, _ = prefill([5, 3])
                rows.extend(new_rows)
                logits, order = torch.cat([logits, new_logits]), order + [5, 3]
            tokens = logits.argmax(-1).tolist()
            for i, token in zip(order, tokens):
                produced[i].append(token)
            staying = [r for r, i in enumerate(order) if len(produced[i]) < 8]
            if len(staying) < len(order):
                rows.select(staying)
                order, tokens = [order[r] for r in staying], [tokens[r] for r in staying]
            if not order:
                break
            logits = rows.step(torch.tensor(tokens))
        eos = tokenizer.eos_token_id
        got = [p[: p.index(eos)] if eos in p else p for p in produced.values()]
        assert got == expected
    finally:
        model.pruning = None


def test_prefill_reports_visual_tokens_kept_by_pruning(loaded, prompts):
    model, _, _ = loaded
    ids, pixels = prompts[0]
    set_plan(model, "sparsevlm")
    try:
        _, _, info = DecodeRows.prefill(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                                        pixels)
    finally:
        model.pruning = None
    assert info.visual_tokens == [64] and info.visual_tokens_kept == [8]
    assert info.prompt_tokens == [len(ids) - 1 + 64]
    assert info.visual_positions == [list(range(1, 65))]  # the image follows the first prompt token
    kept = set(info.kept_positions[0])
    assert len(kept & set(range(1, 65))) == 8 and set(range(info.prompt_tokens[0])) - set(range(1, 65)) <= kept


def run_all(scheduler, requests, stagger=0.0):
    """Submit (ids, pixels, params) from threads, optionally staggered; returns the Finished events in order."""
    results = [None] * len(requests)

    def ask(i):
        results[i] = scheduler.generate(*requests[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
        threading.Event().wait(stagger)
    for thread in threads:
        thread.join(120)
    return results


@pytest.mark.parametrize("plan", ["none", "fastv"])
def test_scheduler_answers_equal_one_at_a_time_generation(loaded, prompts, plan, single_thread):
    model, tokenizer, _ = loaded
    set_plan(model, plan)
    scheduler = Scheduler(model, tokenizer, max_batch_size=4).start()
    try:
        lengths = [3, 9, 5, 12, 1, 7]  # rows leave at different steps
        requests = [(ids, pixels, SamplingParams(max_tokens=n)) for (ids, pixels), n in zip(prompts, lengths)]
        results = run_all(scheduler, requests, stagger=0.01)
        expected = [alone(model, tokenizer, ids, pixels, n) for (ids, pixels), n in zip(prompts, lengths)]
    finally:
        scheduler.close()
        model.pruning = None
    assert [r.token_ids for r in results] == expected
    assert [r.finish_reason for r in results] == ["length" if len(e) == n else "stop"
                                                  for e, n in zip(expected, lengths)]
    assert [r.text for r in results] == [tokenizer.decode(e, skip_special_tokens=True).strip() for e in expected]
    assert max(scheduler.batch_sizes) > 1 and max(scheduler.batch_sizes) <= 4


def test_sampled_answers_do_not_depend_on_the_batch(loaded, prompts, single_thread):
    model, tokenizer, _ = loaded
    scheduler = Scheduler(model, tokenizer, max_batch_size=6).start()
    try:
        params = [SamplingParams(max_tokens=6, temperature=1.5, top_p=0.9, seed=s) for s in range(6)]
        together = run_all(scheduler, [(ids, px, p) for (ids, px), p in zip(prompts, params)])
        one_by_one = [scheduler.generate(ids, px, p) for (ids, px), p in zip(prompts, params)]
        other_seed = scheduler.generate(*prompts[0], SamplingParams(max_tokens=6, temperature=1.5, seed=99))
    finally:
        scheduler.close()
    assert [r.token_ids for r in together] == [r.token_ids for r in one_by_one]
    assert other_seed.token_ids != together[0].token_ids
    greedy = alone(model, tokenizer, *prompts[0], 6)
    assert together[0].token_ids != greedy  # temperature 1.5 on a random model departs from greedy


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])
    assert torch.allclose(top_p_filter(probs, 0.7), torch.tensor([0, 0.5, 0, 0.25]) / 0.75)
    assert torch.allclose(top_p_filter(probs, 0.75), torch.tensor([0, 0.5, 0, 0.25]) / 0.75)
    assert torch.allclose(top_p_filter(probs, 0.76), torch.tensor([0, 0.5, 0.15, 0.25]) / 0.9)
    assert torch.equal(top_p_filter(probs, 0.3), torch.tensor([0, 1.0, 0, 0]))
    logits = torch.log(probs)
    draws = {next_token(logits, SamplingParams(temperature=1, top_p=0.7), torch.Generator().manual_seed(s))
             for s in range(50)}
    assert draws == {1, 3}


def test_stop_strings_end_the_answer_and_streamed_pieces_add_up(loaded):
    _, tokenizer, _ = loaded
    ids = tokenizer("a red circle and a blue square", add_special_tokens=False).input_ids
    answer = AnswerText(tokenizer, ["blue", "zzz"])
    pieces = []
    for token in ids:
        pieces.append(answer.push(token))
        if answer.stopped:
            break
    pieces.append(answer.finish())
    assert answer.stopped and answer.text == "a red circle and a"
    assert "".join(pieces) == answer.text
    plain = AnswerText(tokenizer)
    streamed = "".join(plain.push(t) for t in ids) + plain.finish()
    assert streamed == plain.text == tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_full_queue_is_refused_and_close_drains(loaded, prompts):
    model, tokenizer, _ = loaded
    scheduler = Scheduler(model, tokenizer, max_batch_size=1, max_queue=2)  # not started: nothing leaves the queue
    events = []
    for _ in range(2):
        scheduler.submit(GenerationRequest(*prompts[0], SamplingParams(max_tokens=3), events.append))
    with pytest.raises(QueueFull, match="queue is full"):
        scheduler.submit(GenerationRequest(*prompts[0], SamplingParams(max_tokens=3), events.append))
    scheduler.start().close(timeout=60)
    finished = [e for e in events if isinstance(e, Finished)]
    assert len(finished) == 2 and all(e.finish_reason in ("stop", "length") for e in finished)
    assert all(isinstance(e, (Delta, Finished)) for e in events)
    with pytest.raises(RuntimeError, match="shutting down"):
        scheduler.submit(GenerationRequest(*prompts[0], SamplingParams(max_tokens=3), events.append))


def test_batch_wait_holds_arrivals_while_rows_run_but_never_an_idle_scheduler(loaded, prompts):
    model, tokenizer, _ = loaded
    scheduler = Scheduler(model, tokenizer, max_batch_size=4, batch_wait_ms=60_000)  # not started: _take by hand
    for ids, pixels in prompts[:2]:
        scheduler.submit(GenerationRequest(ids, pixels, SamplingParams(max_tokens=2), lambda event: None))
    assert scheduler._take(room=3, block=False) == []  # rows running: wait for more arrivals
    assert len(scheduler._take(room=4, block=True)) == 2  # idle: start at once
    no_wait = Scheduler(model, tokenizer, max_batch_size=4, batch_wait_ms=0)
    no_wait.submit(GenerationRequest(*prompts[0], SamplingParams(max_tokens=2), lambda event: None))
    assert len(no_wait._take(room=3, block=False)) == 1


def test_visual_tokens_kept_counts_recycled_clusters_as_the_last_layer_sees_them(loaded, prompts):
    """Oracle: the sequence length the LLM's last layer ran on (decoder_forward's tokens_per_layer), less the text."""
    from sparsevl.model.decoder import decoder_forward

    model, _, _ = loaded
    ids, pixels = prompts[0]
    ids_t, mask = torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)
    model.pruning = build_pruning_plan(plan_args("sparsevlm", pruning_layers="0,1", retained_tokens="32,8",
                                                 sparsevlm_recycling="on"), model)
    try:
        _, _, info = DecodeRows.prefill(model, ids_t, mask, pixels)
        inputs, _ = model.prepare_inputs(ids_t, mask, pixels, padding_side="left")
        context = model.pruning_context(ids_t, mask, inputs).padded_to(inputs.inputs_embeds.shape[1])
        out = decoder_forward(model.llm, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids,
                              plan=model.pruning, context=context, padding_side="left")
    finally:
        model.pruning = None
    text_tokens = info.prompt_tokens[0] - info.visual_tokens[0]
    assert info.visual_tokens_kept == [out.tokens_per_layer[-1] - text_tokens]
    assert info.visual_tokens_kept[0] > 8  # clusters were appended on top of the 8 kept
