"""Experiments on the embedded world: the end-to-end demo and the paper's ablations. With
`segcompass.commands`, the only place in segcompass allowed to import `analyses`."""
