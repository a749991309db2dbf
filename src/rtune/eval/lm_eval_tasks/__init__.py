"""lm-evaluation-harness task files shipped with rtune: small offline example tasks (rtune_demo_mc, rtune_demo_gen)."""
