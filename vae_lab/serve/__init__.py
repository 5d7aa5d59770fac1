"""The page to play with logged models: `app` (endpoints), `catalog` (which runs, which first),
`images` (the pictures); `python -m vae_lab.serve` is `__main__`."""
