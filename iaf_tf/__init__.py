"""iaf-tf: a TensorFlow 2 / Keras port of the IAF-VAE (Kingma et al., 2016), faithful to openai/iaf."""
