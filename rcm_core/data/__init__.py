"""Data: the latent data set format (`latents`: Parquet shards + manifest, readers and writers), the built-in
sources (`toy` Gaussian mixture, `moving_fashion` video), video clips (`clips`), the Wan VAE and umT5 encoders
(`encoders`) and the patch-DCT codec of the built-in video latents (`codec`).

May import: `rcm_core.config`. Never imports the networks, the method, parallelism, evaluation or the run layer.
"""
