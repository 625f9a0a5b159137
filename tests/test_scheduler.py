"""The step planner's token budget (engine.scheduler.Scheduler.prefill_plan), on its own state:
decodes first, prompts in arrival order, a long prompt split only when it does not fit."""
from llama_demo.engine.scheduler import Request, Scheduler


def _scheduler(prompts: list[int], rows: int = 8) -> Scheduler:
    s = Scheduler(rows, 4096, prefix_cache=False)
    for i, n in enumerate(prompts):
        s.add(Request(f"r{i}", list(range(1, n + 1))))
    s.admit()
    return s


def _plan(s: Scheduler, budget: int) -> list[tuple[str, int]]:
    return [(seq.req.id, n) for seq, n in s.prefill_plan(budget)]


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
            seq.prefilled += n
        steps += 1
        if short_in is None and not s.running["r1"].prompt_left and not s.running["r2"].prompt_left:
            short_in = steps
    assert short_in == 1 and steps <= 2000 // 128 + 2


def test_prompts_advance_even_when_decodes_fill_the_budget():
    assert _plan(_scheduler([10]), 0) == [("r0", 1)]
    assert _plan(_scheduler([10]), -5) == [("r0", 1)]


def test_sequences_that_decode_or_have_their_prompt_in_are_not_planned():
    s = _scheduler([10, 10])
    s.running["r0"].prefilled, s.running["r0"].out_ids = 10, [7]
    assert _plan(s, 100) == [("r1", 10)]
