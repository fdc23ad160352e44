"""The data DAG: each node binds a per-asset stage to the catalog (what to plan, its params hash, its result
columns); `registry.STAGES` lists them in order. No Prefect here; Ray only through `flux3d.executors`.
"""
