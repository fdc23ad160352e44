"""Engines that run a `pipeline.stage.Stage`: `local` (threads, in this process), `ray` (one actor pool per
stage), and the `journal` that keeps a killed driver's finished results.
"""
