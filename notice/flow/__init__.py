"""How the image reaches the answer: token groups, attention knockout, logit lens and token ablation
(docs/method.md, §10)."""
