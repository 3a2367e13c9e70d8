"""Unsupervised federated session adaptation (egs/session_adapt).

Each session (a voice the seed model never heard) is a client. Its audio is split
into an adaptation part, whose transcripts no stage reads before scoring, a dev
part and a test part, which share no sentence. The seed model labels the
adaptation audio, k2 lattices give each label a confidence, confident labels
train the seed federatedly, and the test parts show what adaptation bought.
"""
