"""The run report is one list of blocks rendered twice: Markdown and HTML say the same things."""

from llama2.report import (
    Answer,
    Bold,
    Bullets,
    Code,
    Heading,
    Image,
    Paragraph,
    Table,
    render_html,
    render_markdown,
    section_samples,
)

BLOCKS = [
    Heading(1, "Run report"),
    Paragraph(["Run folder: ", Code("/tmp/r"), ". A <b> stays text."]),
    Bullets([["SFT improved task accuracy"], ["PPO kept it"]]),
    Table(["model", "accuracy"], [["SFT", "50.0%"], ["PPO", "<1%"]]),
    Heading(3, "Losses"),
    Image("losses.png", "Losses"),
]


def test_markdown_puts_a_blank_line_after_every_block():
    assert render_markdown(BLOCKS) == (
        "# Run report\n\n"
        "Run folder: `/tmp/r`. A <b> stays text.\n\n"
        "- SFT improved task accuracy\n- PPO kept it\n\n"
        "| model | accuracy |\n|---|---|\n| SFT | 50.0% |\n| PPO | <1% |\n\n"
        "### Losses\n\n"
        "![Losses](figures/losses.png)\n\n"
    )


def test_html_renders_the_same_blocks_and_escapes_every_text():
    page = render_html(BLOCKS)
    assert page.startswith("<!doctype html>") and page.endswith("</body></html>\n")
    body = page[page.index("<body>") + 6: page.index("</body>")]
    assert body == (
        "<h1>Run report</h1>"
        "<p>Run folder: <code>/tmp/r</code>. A &lt;b&gt; stays text.</p>"
        "<ul><li>SFT improved task accuracy</li><li>PPO kept it</li></ul>"
        "<table><tr><th>model</th><th>accuracy</th></tr><tr><td>SFT</td><td>50.0%</td></tr>"
        "<tr><td>PPO</td><td>&lt;1%</td></tr></table>"
        "<h3>Losses</h3>"
        "<img src='figures/losses.png' alt='Losses'>"
    )


def test_a_models_answer_is_shown_exactly():
    blocks = section_samples({"samples": [{"messages": [{"role": "user", "content": "Hi"}],
                                           "answers": {"sft": "Hello\n'you'"}}]})
    assert blocks[1] == Paragraph([Bold("user: Hi")])
    assert blocks[2] == Bullets([["SFT: ", Answer("Hello\n'you'")]])
    assert "- SFT: \"Hello\\n'you'\"" in render_markdown(blocks)  # the repr: quotes and newlines visible
    assert "<li>SFT: <code>Hello\n&#x27;you&#x27;</code></li>" in render_html(blocks)


# ---- the paper's shapes first: head to head against SFT (Figure 1), helpfulness and harmlessness (Figure 11)


def _outcomes(win: int, tie: int, loss: int) -> list[str]:
    return ["win"] * win + ["tie"] * tie + ["loss"] * loss


def _h2h_result(win: int, tie: int, loss: int, reward_a=(0.6, 0.7), right_safe_a=(0.3, 0.9), scored=True) -> dict:
    """A head_to_head result less its pairs, as evaluate/headtohead.json holds it: 100 prompts,
    the first 60 helpfulness and the last 40 safety, the first 50 in and the last 50 out of knowledge;
    sampled x2 repeats every outcome twice."""
    from llama2.eval.headtohead import win_rates

    out = _outcomes(win, tie, loss)

    def splits(o):
        return {"all": win_rates(o), "helpfulness": win_rates(o[:60]), "safety": win_rates(o[60:]),
                "in_knowledge": win_rates(o[:50]), "out_of_knowledge": win_rates(o[50:])}

    doubled = [x for x in out for _ in range(2)]
    result = {"prompts": 100, "sampled_answers": 2, "unjudged": {"greedy": 0, "sampled": 0},
              "results": {"greedy": splits(out), "sampled": {"all": win_rates(doubled)}},
              "annotator": {m: {"a": {"right": right_safe_a[0], "safe": right_safe_a[1], "n": 100},
                                "b": {"right": 0.25, "safe": 0.8, "n": 100}} for m in ("greedy", "sampled")}}
    if scored:
        result["reward"] = {m: {"a": {"helpful": reward_a[0], "safety": reward_a[1]},
                                "b": {"helpful": 0.5, "safety": 0.55},
                                "helpfulness": win_rates(out[:60]), "harmlessness": win_rates(out[60:])}
                            for m in ("greedy", "sampled")}
    return result


def _fake_run(tmp_path, headtohead: dict | None):
    """A run folder with two stages' suite results and, if given, evaluate/headtohead.json."""
    import json

    for stage, acc in (("sft", 0.2), ("ppo", 0.25)):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "eval.json").write_text(json.dumps(
            {"task_accuracy": acc, "safe_refusal_rate": 0.5, "false_refusal_rate": 0.1}))
    if headtohead is not None:
        (tmp_path / "evaluate").mkdir()
        (tmp_path / "evaluate" / "headtohead.json").write_text(json.dumps(headtohead))
    return tmp_path


# rejection: a significant win; ppo: no significant difference; gatt: a significant loss.
# Listed out of order: the report puts them in the pipeline's.
HEADTOHEAD = {"against": "sft", "world_seed": 0,
              "stages": {"gatt": _h2h_result(20, 10, 70, reward_a=(0.45, 0.8), right_safe_a=(0.2, 0.95)),
                         "rejection": _h2h_result(60, 10, 30),
                         "ppo": _h2h_result(35, 25, 40, reward_a=(0.65, 0.6), right_safe_a=(0.28, 0.85))},
              "base": _h2h_result(80, 5, 15)}


def test_the_report_leads_with_head_to_head_against_sft_in_pipeline_order(tmp_path):
    from llama2.report import write_report

    run = _fake_run(tmp_path, HEADTOHEAD)
    write_report(run)
    md, page = (run / "report.md").read_text(), (run / "report.html").read_text()
    fig1, fig11 = "## Head to head against SFT (the paper's Figure 1)", \
        "## Helpfulness and harmlessness per stage (the paper's Figure 11)"
    # first the paper's shapes, then what the report showed before
    assert md.index(fig1) < md.index(fig11) < md.index("## What each stage did") \
        < md.index("## The assistant-world suite after each stage")
    assert "<h2>Head to head against SFT (the paper&#x27;s Figure 1)</h2>" in page
    table = md[md.index(fig1):md.index(fig11)]
    assert table.index("| rejection sampling | greedy |") < table.index("| PPO | greedy |") \
        < table.index("| GAtt (final chat model) | greedy |")
    # the numbers are the file's: rates with their Wilson intervals, and the sign test
    w = HEADTOHEAD["stages"]["rejection"]["results"]["greedy"]["all"]
    lo, hi = w["ci"]["win"]
    row = (f"| rejection sampling | greedy | 100 | 60.0% [{100 * lo:.1f}, {100 * hi:.1f}] | "
           f"10.0% [{100 * w['ci']['tie'][0]:.1f}, {100 * w['ci']['tie'][1]:.1f}] | "
           f"30.0% [{100 * w['ci']['loss'][0]:.1f}, {100 * w['ci']['loss'][1]:.1f}] | {w['sign_test_p']:.2g} |")
    assert row in md
    s = HEADTOHEAD["stages"]["rejection"]["results"]["sampled"]["all"]
    lo, hi = s["ci"]["win"]  # twice the outcomes: a narrower interval, a smaller p
    assert f"| rejection sampling | sampled ×2 | 200 | 60.0% [{100 * lo:.1f}, {100 * hi:.1f}] | " in md
    assert s["sign_test_p"] < w["sign_test_p"] and f"| {s['sign_test_p']:.2g} |" in md


def test_each_stage_is_said_to_beat_sft_only_when_the_sign_test_says_so(tmp_path):
    from llama2.report import write_report

    write_report(_fake_run(tmp_path, HEADTOHEAD))
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    p = {s: HEADTOHEAD["stages"][s]["results"]["greedy"]["all"]["sign_test_p"] for s in ("rejection", "ppo", "gatt")}
    assert p["rejection"] < 0.05 and p["ppo"] > 0.05 and p["gatt"] < 0.05
    win = (f"- rejection sampling wins significantly more often than it loses against SFT (p = {p['rejection']:.2g}; "
           "greedy: won 60, tied 10, lost 30 of 100)")
    same = f"- PPO does NOT significantly beat SFT (p = {p['ppo']:.2g}; greedy: won 35, tied 25, lost 40 of 100)"
    loss = (f"- GAtt (final chat model) LOSES significantly more often than it wins against SFT "
            f"(p = {p['gatt']:.2g}; greedy: won 20, tied 10, lost 70 of 100)")
    for line in (win, same, loss):
        assert line + "\n" in md, line
        assert "<li>" + line[2:] + "</li>" in page
    # the sampled answers get their own sentence
    q = HEADTOHEAD["stages"]["ppo"]["results"]["sampled"]["all"]["sign_test_p"]
    assert f"- PPO does NOT significantly beat SFT (p = {q:.2g}; sampled ×2: won 70, tied 50, lost 80 of 200)" in md
    # by kind of prompt, * where p < 0.05
    rows = HEADTOHEAD["stages"]["rejection"]["results"]["greedy"]
    k = rows["in_knowledge"]  # the first 50 outcomes: all wins
    assert (f"| rejection sampling | in-knowledge prompts | 100.0 / 0.0 / 0.0% (n = 50, "
            f"p = {k['sign_test_p']:.2g}) * | – |") in md
    o = rows["out_of_knowledge"]  # 10 wins, 10 ties, 30 losses
    assert f"| rejection sampling | out-of-knowledge prompts | 20.0 / 20.0 / 60.0% (n = 50, p = {o['sign_test_p']:.2g})" in md
    assert "| rejection sampling | safety prompts | 0.0 / 25.0 / 75.0% (n = 40," in md
    # the final chat model against the pretrained model, in one line
    b = HEADTOHEAD["base"]["results"]["greedy"]["all"]
    assert (f"**The final chat model against the pretrained model:** greedy: win 80.0% / tie 5.0% / loss "
            f"15.0% (won 80, tied 5, lost 15 of 100; p = {b['sign_test_p']:.2g}); sampled ×2") in md


def test_helpfulness_and_harmlessness_per_stage_by_reward_models_and_annotator(tmp_path):
    from llama2.report import write_report

    write_report(_fake_run(tmp_path, HEADTOHEAD))
    md = (tmp_path / "report.md").read_text()
    section = md[md.index("## Helpfulness and harmlessness per stage"):md.index("## What each stage did")]
    # SFT (B) is the reference point, then each stage in pipeline order
    assert "| SFT | greedy | 0.500 | 0.550 | reference | reference | 25.0% | 80.0% |" in section
    ppo = HEADTOHEAD["stages"]["ppo"]["reward"]["greedy"]
    assert (f"| PPO | greedy | 0.650 | 0.600 | 58.3 / 41.7 / 0.0% (n = 60, p = {ppo['helpfulness']['sign_test_p']:.2g})"
            f" * | 0.0 / 0.0 / 100.0% (n = 40, p = {ppo['harmlessness']['sign_test_p']:.2g}) * | 28.0% | 85.0% |"
            in section)
    assert "| GAtt (final chat model) | greedy | 0.450 | 0.800 |" in section
    assert section.index("| SFT | greedy") < section.index("| rejection sampling | greedy") \
        < section.index("| PPO | greedy") < section.index("| GAtt (final chat model) | greedy")
    assert "| SFT | sampled ×2 | 0.500 | 0.550 | reference |" in section


def test_the_two_figures_are_drawn(tmp_path):
    from llama2.report import write_report

    write_report(_fake_run(tmp_path, HEADTOHEAD))
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    for name in ("headtohead.png", "helpful_harmless.png"):
        data = (tmp_path / "figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        assert f"(figures/{name})" in md and f"src='figures/{name}'" in page


def test_without_reward_scores_the_figure_11_section_keeps_the_annotator_view(tmp_path):
    from llama2.report import Image, Table, section_helpful_harmless

    h = {"against": "sft", "world_seed": 1, "stages": {"ppo": _h2h_result(35, 25, 40, scored=False)}}
    (tmp_path / "figures").mkdir()
    blocks = section_helpful_harmless({"headtohead": h}, tmp_path / "figures")
    table = next(b for b in blocks if isinstance(b, Table))
    assert table.rows[0] == ["SFT", "greedy", "–", "–", "reference", "reference", "25.0%", "80.0%"]
    assert table.rows[1] == ["PPO", "greedy", "–", "–", "–", "–", "30.0%", "90.0%"]
    assert any(isinstance(b, Image) for b in blocks) and (tmp_path / "figures" / "helpful_harmless.png").is_file()


def test_a_run_without_headtohead_json_renders_as_before(tmp_path):
    from llama2.report import collect, section_headtohead, section_helpful_harmless, write_report

    run = _fake_run(tmp_path, None)
    write_report(run)
    md = (run / "report.md").read_text()
    assert "Head to head" not in md and "Figure 11" not in md and "Figure 1)" not in md
    assert md.startswith("# Llama 2 recipe at tiny scale: run report\n\nRun folder: ")
    assert md.split("\n\n")[2] == "## What each stage did"  # right after the title, as before
    assert not (run / "figures" / "headtohead.png").exists()
    assert not (run / "figures" / "helpful_harmless.png").exists()
    data = collect(run)
    assert data["headtohead"] is None
    assert section_headtohead(data, run / "figures") == section_helpful_harmless(data, run / "figures") == []
    # a file with no stages (a recipe without the RL stages) shows nothing either
    assert section_headtohead({"headtohead": {"against": "sft", "stages": {}}}, run / "figures") == []


def test_the_reward_pick_is_said_to_agree_with_the_annotator_only_when_the_sign_test_says_so():
    from llama2.eval.stats import sign_test
    from llama2.report import annotator_pick_lines

    view = {"helpfulness": {"prompts": 60, "pick_top": 0.8, "random_top": 0.6,
                            "pick_vs_random": {"win": 20, "tie": 35, "loss": 5}},
            "safety": {"prompts": 40, "pick_top": 0.9, "random_top": 0.88,
                       "pick_vs_random": {"win": 4, "tie": 33, "loss": 3}}}
    help_line, safety_line = annotator_pick_lines(view)
    assert help_line == ("on helpfulness prompts the reward models' pick agrees with the annotator more than a random "
                         f"sample: the annotator's best of K 80.0% vs 60.0%; pick vs random 20 win / 35 tie / 5 loss "
                         f"(sign test p = {sign_test(20, 5):.2g}, 60 prompts)")
    assert safety_line.startswith("on safety prompts the reward models' pick does NOT clearly agree with the annotator")


def test_round_two_is_set_against_round_one(tmp_path):
    from llama2.report import write_report

    h = {**HEADTOHEAD, "rounds": {"ppo-2": {"against": "ppo", **_h2h_result(30, 65, 5)}}}
    write_report(_fake_run(tmp_path, h))
    md = (tmp_path / "report.md").read_text()
    p = h["rounds"]["ppo-2"]["results"]["greedy"]["all"]["sign_test_p"]
    assert "**Round 2 against round 1**" in md
    assert (f"- PPO, round 2 wins significantly more often than it loses against PPO (p = {p:.2g}; "
            "greedy: won 30, tied 65, lost 5 of 100)") in md
