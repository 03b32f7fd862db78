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
