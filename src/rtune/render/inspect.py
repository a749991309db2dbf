"""Views of a rendered sequence for people: JSON for `rtune data inspect --json`, highlighted text."""

from __future__ import annotations

from rtune.render.renderer import IGNORE, RenderedSequence, Renderer


def describe(renderer: Renderer, seq: RenderedSequence) -> dict:
    """JSON view of a rendered sequence, for `rtune data inspect --json`."""
    trained = [t for t, lab in zip(seq.input_ids, seq.labels) if lab != IGNORE]
    tok = renderer.tokenizer
    return {
        "id": seq.id,
        "input_ids": seq.input_ids,
        "labels": seq.labels,
        "num_tokens": len(seq.input_ids),
        "num_trained": len(trained),
        "text": tok.decode(seq.input_ids),
        "trained_text": tok.decode(trained),
    }


def visualize(renderer: Renderer, seq: RenderedSequence, color: bool = True) -> str:
    """The rendered text with trained tokens highlighted (green) or, without colour, inside ⟦ ⟧."""
    tok = renderer.tokenizer
    out, run, run_trained = [], [], None

    def flush():
        if not run:
            return
        text = tok.decode(run)
        if run_trained:
            out.append(f"\x1b[42;30m{text}\x1b[0m" if color else f"⟦{text}⟧")
        else:
            out.append(text)

    for t, lab in zip(seq.input_ids, seq.labels):
        trained = lab != IGNORE
        if trained != run_trained:
            flush()
            run, run_trained = [], trained
        run.append(t)
    flush()
    return "".join(out)
