"""The step planner (engine.scheduler.Scheduler) on its own state: the token budget (decodes
first, prompts in arrival order, a long prompt split only when it does not fit) and the paged KV
cache's blocks (admission by free blocks, sharing by prefix, eviction, preemption)."""
from llama_demo.engine.sampler import SamplingParams
from llama_demo.engine.scheduler import Request, Scheduler


def _scheduler(prompts: list[int], rows: int = 8, blocks: int = 1024, block_size: int = 16,
               prefix_cache: bool = False) -> Scheduler:
    s = Scheduler(rows, min(4096, blocks * block_size), blocks, block_size, prefix_cache=prefix_cache)
    for i, n in enumerate(prompts):
        s.add(Request(f"r{i}", list(range(1, n + 1))))
    s.admit()
    return s


def _plan(s: Scheduler, budget: int) -> list[tuple[str, int]]:
    return [(seq.req.id, n) for seq, n in s.prefill_plan(budget)]


def _run(s: Scheduler, budget: int = 256, steps: int = 50) -> None:
    """Steps until every running sequence has its prompt in and nothing waits, or `steps` steps
    (each sampled token: id 7)."""
    for _ in range(steps):
        if not (any(seq.prompt_left for seq in s.running.values()) or s.waiting):
            return
        step = s.schedule(budget)
        for seq in step.decoding:
            s.computed(seq, 1)
            seq.out_ids.append(7)
        for seq, n in step.prefill:
            s.computed(seq, n)
            if not seq.prompt_left and not seq.out_ids:
                seq.out_ids.append(7)


def test_prompts_that_fit_enter_whole_in_arrival_order():
    assert _plan(_scheduler([40, 30, 20]), 100) == [("r0", 40), ("r1", 30), ("r2", 20)]


def test_a_prompt_is_split_only_when_it_does_not_fit():
    # alone, a long prompt takes the whole budget; the last one that does not fit takes what is left
    assert _plan(_scheduler([1000]), 256) == [("r0", 256)]
    assert _plan(_scheduler([100, 1000]), 256) == [("r0", 100), ("r1", 156)]


def test_a_long_prompt_leaves_room_for_short_ones_behind_it():
    s = _scheduler([2000, 50, 30])
    assert _plan(s, 256) == [("r0", 128), ("r1", 50), ("r2", 30)]
    steps, short_in = 0, None
    while any(seq.prompt_left for seq in s.running.values()):  # the short ones enter at the first step
        for seq, n in s.prefill_plan(256):
            s.computed(seq, n)
        steps += 1
        if short_in is None and not s.running["r1"].prompt_left and not s.running["r2"].prompt_left:
            short_in = steps
    assert short_in == 1 and steps <= 2000 // 128 + 2


def test_prompts_advance_even_when_decodes_fill_the_budget():
    assert _plan(_scheduler([10]), 0) == [("r0", 1)]
    assert _plan(_scheduler([10]), -5) == [("r0", 1)]


def test_sequences_that_decode_or_have_their_prompt_in_are_not_planned():
    s = _scheduler([10, 10])
    s.computed(s.running["r0"], 10)
    s.running["r0"].out_ids = [7]
    assert _plan(s, 100) == [("r1", 10)]


def test_capacity_is_blocks_not_rows():
    # 32 short prompts in the memory of two 512-token rows (64 blocks of 16): all run at once
    s = _scheduler([20] * 32, rows=32, blocks=64)
    assert len(s.running) == 32 and not s.waiting
    # a 33rd cannot: 32 x 2 blocks (prompt and first answer token) are taken
    s.add(Request("late", list(range(1, 21))))
    _run(s, steps=3)
    assert "late" not in s.running and s.pool.used == 64


def test_a_shared_prefix_is_held_once_and_reused_after_its_sequence_ends():
    s = Scheduler(8, 1024, 64, 16)
    system = list(range(100, 164))  # 64 tokens: 4 full blocks
    s.add(Request("a", system + [1, 2, 3]))
    _run(s)
    a = s.running["a"]
    s.add(Request("b", system + [4, 5]))
    s.add(Request("n1", system + [4, 5]))  # the same prompt again (n choices): shares b's blocks too
    _run(s)
    b, n1 = s.running["b"], s.running["n1"]
    assert b.reused == 64 and b.blocks[:4] == a.blocks[:4]
    assert n1.reused == 64 and n1.blocks[:4] == a.blocks[:4]  # b's 5th block is partial: not shared
    assert all(s.pool.holders[blk] == 3 for blk in a.blocks[:4])
    for seq in (a, b, n1):
        s.retire(seq)
    assert s.pool.used == 0 and len(s.pool.cached) == 4  # the prefix stays, for the next one
    s.add(Request("c", system + [9]))
    _run(s)
    assert s.running["c"].reused == 64


def test_n_choices_admitted_together_prefill_their_prompt_once():
    s = Scheduler(8, 1024, 64, 16, prefix_cache=True)
    prompt = list(range(1, 50))  # 3 full blocks, then a partial one
    for i in range(3):
        s.add(Request(f"c{i}", prompt))
    fed = 0
    for _ in range(20):
        step = s.schedule(256)
        for seq, n in step.prefill:
            fed += n
            s.computed(seq, n)
            if not seq.prompt_left and not seq.out_ids:
                seq.out_ids.append(7)
    assert [s.running[f"c{i}"].reused for i in range(3)] == [0, 48, 48]
    assert fed == 49 + 1 + 1  # the prompt once, and each copy's last token for its own first logits


def test_the_least_recently_released_prefix_is_evicted_first():
    s = Scheduler(8, 128, 8, 16)  # 8 blocks of 16
    for name, base in (("old", 1000), ("new", 2000)):
        s.add(Request(name, list(range(base, base + 33))))  # 2 full blocks each, + 1 token
        _run(s)
        s.retire(s.running[name])
    assert len(s.pool.cached) == 4
    # 4 blocks are free (each retired sequence's partial third block, and two never used); this one
    # needs 6 (95 tokens and its first answer token): the two cached blocks of 'old' go, not 'new''s
    s.add(Request("big", list(range(3000, 3000 + 95))))
    _run(s)
    s.add(Request("old2", list(range(1000, 1033))))
    s.add(Request("new2", list(range(2000, 2033))))
    s.retire(s.running["big"])
    _run(s)
    assert s.running["old2"].reused == 0 and s.running["new2"].reused == 32


def test_the_youngest_is_preempted_when_blocks_run_out_and_resumes_with_its_answer():
    s = Scheduler(4, 96, 6, 16, prefix_cache=True)  # 6 blocks: two sequences of 40 tokens + growth
    s.add(Request("old", list(range(1, 31))))
    s.add(Request("young", list(range(100, 131))))
    _run(s)
    young = s.running["young"]
    answers = {"old": 0, "young": 0}
    preempted = False
    for _ in range(40):
        step = s.schedule(256)
        for seq in step.decoding:
            s.computed(seq, 1)
            seq.out_ids.append(5)
            answers[seq.req.id] += 1
        for seq, n in step.prefill:
            s.computed(seq, n)
        preempted = preempted or "young" not in s.running
        if "old" in s.running and len(s.running["old"].out_ids) >= 33:
            s.retire(s.running["old"])
    assert preempted and young.preemptions >= 1
    assert "young" in s.running and young.out_ids and young.computed == young.length - 1  # decoding again
    assert young.out_ids[0] == 7  # its first answer token kept across the preemption


def test_a_request_scoring_its_prompt_reuses_nothing():
    s = Scheduler(8, 1024, 64, 16)
    s.add(Request("a", list(range(1, 40))))
    _run(s)
    s.add(Request("echo", list(range(1, 40)), SamplingParams(prompt_logprobs=1)))
    _run(s)
    assert s.running["echo"].reused == 0
