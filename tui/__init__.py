"""mipo_mlx_tui: the Textual terminal UI of mipo-mlx (installed from the tui/ folder).

    mipo-mlx tui [RUN_DIR | OUTPUT_DIR | RECIPE]

It only reads what a run writes (events.jsonl, pairs.jsonl, compare/answers.jsonl)
and starts training as a separate `mipo-mlx train` process; see app.py.
"""
