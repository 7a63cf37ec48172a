"""The measurements behind weight-level editing: every configuration tried, with its figures.

Kept apart from `knowledge.edit` (the code) so the record can grow with each model measured.
Commands: `python bench/edit.py` (embedded model), `python bench/edit.py --model PATH` (any
model, see bench/edit_real.py).

Embedded model (a 5M Llama trained on the facts table)
======================================================

**Why MEMIT is the default.** Measured by `bench/edit.py` on the embedded model (10 training
phrasings per relation, trained with reworded phrasings; 99.7% train-template top-1), 50
counterfactual capital edits applied together, 120 locality facts (`python bench/edit.py`):

=========  ========  ======  =======  =========  ========  ========  =====================================
mode       efficacy  full    gen all  gen known  locality  survival  one edit alone: eff / full / gen / loc
=========  ========  ======  =======  =========  ========  ========  =====================================
memit *      100.0%   94.0%    97.3%      97.3%     95.8%    100.0%  100 / 100 / 93.3 / 99.7 %
knn          100.0%    0.0%   100.0%     100.0%     40.0%     75.9%  100 / 0 / 100 / 96.9 %
compose      100.0%   86.0%    76.0%      76.5%     91.7%    100.0%  100 / 95 / 65.0 / 99.5 %
=========  ========  ======  =======  =========  ========  ========  =====================================

(``full``: greedy generation spells the whole new target. The last column: 20 of the edits,
each inserted alone into a fresh overlay.)

MEMIT is the only mode that meets the efficacy, locality and survival targets together: it is a
plain weight edit, so COMPILE INTO MODEL and transformers reproduce it exactly. KNN is exact on
the literal prompt and its key fires on paraphrases too, but it also fires on other countries'
capital prompts (locality 40%), is invisible to generation (``full`` 0%), and COMPILE INTO MODEL
has to materialise it as a weight edit, which changes a quarter of the top-1s. COMPOSE (a
feature slot per fact, see the sixth pass) now states every fact, but its keys leak onto other
prompts more than MEMIT's least-squares update does (locality 91.7% at 50). ``gen known`` is
over the held-out paraphrases the unedited model answers correctly (149 of 150 on this model;
see the fourth pass for how that came about).

How MEMIT's key position, layers and μ were chosen (`memit.py` documents the solver). First on
the previous embedded model (92% train top-1), 10 edits:

==========================================  ========  =======  ========
configuration                               efficacy  paraph.  locality
==========================================  ========  =======  ========
subject key, layers 0–1 (previous default)       50%      13%       75%
subject key, layers 0–1, 60 steps, lr ×10         60%      20%       54%
subject key, layers 0–2                           20%       7%       62%
last-token key, layers 0–1 (mean key)            100%      50%       49%
last-token key, layer 2, key per phrasing        100%      70%       65%
  + preservation of known facts' keys μ=1e3      100%      50%       79%
  + μ=1e4                                          60%      27%       94%
exact fit ΔW K = R under λC+μP (any μ)           100%   50–60%    18–44%
==========================================  ========  =======  ========

Causal check (the optimised residual shift injected directly, no weight edit): at the
subject's last token it moves the prediction for only 80% / 60% / 0% of edit prompts at layers
0 / 1 / 2 (40% / 30% / 0% of paraphrases) — this 4-layer model recalls a capital mostly at the
last position, not by attention reading an edited subject state — while at the last token it
reaches 100% of edit prompts and paraphrases at layers 0, 1 and 2. So the key is the last
token, and the edit sits in layer 2, where that token already carries the entity. Then μ on
the retrained model, 50 edits (100 locality facts):

==========================  ========  =======  ========
layer 2, key per phrasing   efficacy  paraph.  locality
==========================  ========  =======  ========
μ = 3e3                        100%      49%       84%
μ = 6e3                         98%      46%       93%
μ = 8e3 (default)               98%      43%       96%
μ = 1e4                         94%      41%       96%
μ = 3e4                         74%      27%       98%
layers 1–2, μ = 6e3             74%      31%       64%
==========================  ========  =======  ========

Locality trades against efficacy and paraphrases because other capital prompts share most of
their last-token key; μ = 8e3 is the smallest preservation weight that keeps locality ≥ 95%.

Paraphrase generalisation, second pass. `bench/edit.py` now prints two columns: ``gen all``
(every held-out paraphrase) and ``gen known`` (only the held-out paraphrases the unedited model
answers with the true capital: what the edit carries over, apart from what the model knows;
that model's own held-out capital top-1 was ≈ 71%). ROME-style context prefixes (`MemitParams.
context_prefixes`: each training phrasing also after n generic sentences of the facts table,
never a held-out template) were measured at 20 edits, layer 2, μ = 8e3, on a loaded machine
(43 of the 60 held-out paraphrases known to the unedited model):

===============================================  ========  =======  =========  ========
configuration (20 edits)                         efficacy  gen all  gen known  locality
===============================================  ========  =======  =========  ========
default (no prefixes)                                 90%      38%        53%       98%
δ stop_prob 0.99, 60 steps                            85%      38%        53%       98%
3 prefixes in δ's loss and in the keys                95%      48%        63%       92%
3 prefixes in δ's loss only                           90%      38%        53%      100%
3 prefixes in the keys only                           90%      47%        60%       91%
6 prefixes in the keys only                           90%      50%        65%       85%
6 prefixes in the keys only, μ = 1.6e4                90%      45%        60%       93%
3 prefixes in keys and in the preserved keys          85%      48%        63%       85%
===============================================  ========  =======  =========  ========

Prefixed keys are what carries an edit to unseen phrasings (+10 points ``gen known``), but they
are closer to other countries' capital keys, so locality falls below 95%, and raising μ gives
the gain back; adding the same prefixes to the preserved known-fact keys did not recover it.
At 50 edits (111 of 150 held-out paraphrases known to the unedited model):

===============================================  ========  =======  =========  ========
configuration (50 edits)                         efficacy  gen all  gen known  locality
===============================================  ========  =======  =========  ========
default (no prefixes), survival 100%                 98.0%    42.7%      55.0%     96.7%
3 prefixes in the keys only                          98.0%    46.7%      57.7%     81.7%
3 prefixes in the keys only, μ = 2e4                 88.0%    40.7%      49.5%     91.7%
3 prefixes in the keys only, μ = 4e4                 84.0%    34.7%      44.1%     95.8%
===============================================  ========  =======  =========  ========

At equal locality the prefixes buy no generalisation: they trade along the same
locality/generalisation curve as μ does.
No configuration met generalisation ≥ 70% with locality ≥ 95%, so the default stays without
prefixes (`context_prefixes=0`); the prefix options stay available as INSERT hyper-parameters.

Third pass: the last layer, on the current embedded model. The tables above were measured on
models trained with 5 phrasings per relation. Per held-out template the 50-edit default then
reached 94% / 14% / 20% ("The capital city of X is" / "X's capital is" / "The government of
X sits in"): the edit followed the surface form. The current model is trained with 10
phrasings per relation (none of them a held-out template), so an edit also has 10 keys per
fact; and the key moved to the last layer, where the FFN input at the last token already
holds the answer the model is about to give: paraphrases the model answers alike share it,
other countries' prompts (about to give other capitals) do not. 50 edits, this model (103 of
the 150 held-out paraphrases known to the unedited model; ``loc cap`` / ``loc other`` split
locality into other countries' capitals and other relations):

============================  ========  =======  =========  ========  =======  =========
configuration (50 edits)      efficacy  gen all  gen known  locality  loc cap  loc other
============================  ========  =======  =========  ========  =======  =========
layer 2, μ = 8e3                 96.0%    63.3%      92.2%     80.0%        —          —
layer 2, μ = 1.6e4               92.0%    56.7%      82.5%     89.2%        —          —
layer 2, μ = 3.2e4               68.0%    42.7%      62.1%     95.8%        —          —
layer 3, μ = 2e3                100.0%    70.0%      99.0%     82.5%      78%        87%
layer 3, μ = 8e3                100.0%    66.7%      96.1%     93.3%      95%        92%
layer 3, μ = 1.6e4              100.0%    66.0%      95.1%     95.0%      97%        93%
layer 3, μ = 2e4 (then default) 98.0%    63.3%      91.3%     96.7%      98%        95%
layer 3, μ = 3.2e4               92.0%    61.3%      88.3%     96.7%      98%        95%
layers 2–3, μ = 1.6e4            50.0%    30.0%      42.7%     55.0%      20%        90%
============================  ========  =======  =========  ========  =======  =========

Per held-out template the default reached 96% / 92% / 2%. The unedited model answered the
third paraphrase ("The government of X sits in") for only 3 of the 50 edited countries (the
first two for all 50), so ``gen all`` was capped near 103/150 = 68.7% by what the model knew,
not by the edit: ``gen known`` 91.3%, ``gen all`` 63.3% (target 70%).

Fourth pass: a model that knows its paraphrases, and no KL term. "sits" never occurs in the
training text: the tokenizer splits it into pieces that never followed an entity, and the
model answered " the" (a continent-style continuation) for 28 of the 50. The training script
now rewords 30% of the fact sentences (`reworded`: one word dropped, replaced by a made-up word
or a made-up word inserted, never the entity), so wording it has not seen stops hiding the
fact (held-out top-1 capital 67.4% → 98.9%, all relations 40.5% → 69.0%; 149 of the 150
paraphrases known). On that model, 50 edits, layer 3 (``loc cap`` / ``loc other`` as above;
per-template gen over the three held-out paraphrases):

==================================  ========  =======  ========  =======  =========  =============
configuration (50 edits)            efficacy  gen all  locality  loc cap  loc other  per template
==================================  ========  =======  ========  =======  =========  =============
μ = 2e4, KL 0.0625 (third pass)        92.0%    82.0%     94.2%      95%        93%  90/88/68%
μ = 1e4, KL 0.0625                    100.0%    94.7%     85.0%      80%        90%  98/96/90%
μ = 4e4, KL 0.0625                     64.0%    57.3%     96.7%      98%        95%  66/68/38%
μ = 2e4, KL, 60 steps, stop 0.97       84.0%    76.0%     93.3%      93%        93%  84/84/60%
μ = 2e4, KL, exact solve              100.0%    94.7%     41.7%      23%        60%  100/100/84%
μ = 2e4, KL, keys: 5 phrasings         66.0%    55.3%     96.7%      98%        95%  64/64/38%
layer 2, μ = 8e3, KL                   92.0%    72.7%     71.7%      62%        82%  88/80/50%
μ = 2e4, no KL                        100.0%    97.3%     95.8%      98%        93%  100/98/94%
μ = 2.5e4, no KL (default)            100.0%    94.0%     96.7%      98%        95%  98/96/88%
μ = 3.2e4, no KL                       94.0%    90.7%     96.7%      98%        95%  96/94/82%
==================================  ========  =======  ========  =======  =========  =============

ROME's KL term keeps the "{X} is" distribution fixed while δ is added at the key position; for
subject keys that is the subject's state, but a last-token δ lands on the prediction after
"{X} is" itself, so the term pulled δ away from the target direction; without it every target
is met. μ was then checked on two more counterfactual assignments (`bench/edit.py --shift`
13 and 21; 7 is the default) and at 100 edits, without the KL term:

=====================  ==========================  ==========================
edit set               μ = 2e4: eff / gen / loc    μ = 2.5e4: eff / gen / loc
=====================  ==========================  ==========================
50 edits, shift 7      100 / 97.3 / 95.8 %         100 / 94.0 / 96.7 %
50 edits, shift 13     100 / 97.3 / 95.0 %         100 / 96.0 / 95.8 %
50 edits, shift 21     100 / 98.7 / 96.7 %         100 / 97.3 / 96.7 %
100 edits, shift 7      99 / 97.7 / 93.3 %          99 / 95.3 / 95.8 %
=====================  ==========================  ==========================

At μ = 2e4 locality sat on the 95% line (one locality fact from missing it at shift 13) and
missed it at 100 edits; μ = 2.5e4 keeps a margin everywhere for a few points of paraphrase
generalisation, so it is the default. Wording noise at 50% of the sentences (measured too) made
the model harder to edit (μ = 2e4 with the KL term: 74% efficacy, 89.2% locality, against 92% /
94.2% at 30%; not measured without the term), so 30% ships.

Fifth pass: single edits, and rounds. All the above applied 50 edits together. One edit alone
(``bench/edit.py``'s second table: 50 edits, each in a fresh overlay) was met only 86% of the
time, and hand-picked ones failed outright (France → Rome answered " Fort", France → Madrid
" Paris"): a batch's many key columns weigh against μP, one fact's ten do not, so the ridge
solution stops short of the target. `MemitParams.rounds` (3) re-solves, from the model as
already edited, the facts some training phrasing of which does not predict the target yet, and
sums the passes into one rank-k delta per layer (μ = 2.5e4 in both columns):

==========================  ==========================  ==========================
edit set                    1 round: eff / gen / loc    3 rounds: eff / gen / loc
==========================  ==========================  ==========================
50 edits, shift 7           100 / 94.0 / 96.7 %         100 / 98.7 / 96.7 %
50 edits, shift 13          100 / 96.0 / 95.8 %         100 / 98.0 / 95.8 %
50 edits, shift 21          100 / 97.3 / 96.7 %         100 / 98.0 / 96.7 %
100 edits, shift 7           99 / 95.3 / 95.8 %         100 / 96.7 / 95.0 %
50 single edits, shift 7     86 / 63.3 / 99.9 %         100 / 91.3 / 99.8 %
==========================  ==========================  ==========================

MEMIT's statistics (C, P) are computed with the base FFN whatever overlay the session runs
(they were computed through it, so a tombstoned feature made C singular and the disk cache
depended on the first session's edits).

Sixth pass: whole targets. Efficacy counts the target's first token, and most capitals are
several tokens here (" Saint John's", " Rio de Janeiro" is 8); a last-layer edit at the
prompt's last position cannot reach the tokens generated after it, so France → Rio de Janeiro
generated " Ri." ``full`` (greedy generation spells the whole target) was added to the
benchmark, and each later target token became its own key → value pair (the phrasing followed
by the target's first j tokens; `memit.EditSites`). Writing every later token, and re-writing
the unmet ones in later rounds, broke large batches (efficacy 58–84%, locality 35–68% at 100
edits, over four variants): targets that continue one token differently (" Port" → "-au-Prince"
/ " Louis") share their key. What ships: the first pass writes the later tokens the unedited
model does not already complete, minus such conflicts; later passes re-write unmet first tokens,
and a single fact's later tokens too. δ's early stop went from 0.9 to 0.99 (0.9 cost 2–8 points
of paraphrase generalisation once δs stopped running all 30 steps for multi-token targets).
Keys at the answers' inner positions added to P measured worse (11 against 8 locality misses at
100 edits) and were dropped. Against the fifth pass (3 rounds, first tokens only), same sets:

==========================  ==========================  ===========================
edit set                    fifth: eff / gen / loc      sixth: eff / full / gen / loc
==========================  ==========================  ===========================
50 edits, shift 7           100 / 98.7 / 96.7 %         100 / 94 / 97.3 / 95.8 %
50 edits, shift 13          100 / 98.0 / 95.8 %         100 / 88 / 97.3 / 97.5 %
50 edits, shift 21          100 / 98.0 / 96.7 %         100 / 88 / 97.3 / 96.7 %
100 edits, shift 7          100 / 96.7 / 95.0 %         100 / 85 / 95.7 / 92.5 %
20 single edits, shift 7    100 / 88.3 / 99.8 %         100 / 100 / 93.3 / 99.7 %
==========================  ==========================  ===========================

(``full`` of the fifth pass: 92% at 50 edits, 95% single.) Single edits, the common case, gain
most (every target generated whole, paraphrases 88.3 → 93.3%); batches keep their first-token
figures at 50 edits and lose 2.5 points of locality at 100. COMPOSE, redesigned in the same pass
(contrastive key, optimised value, cross-fact check counting only installs this one broke):
50 together 0 → 100% efficacy, paraphrases 0 → 76%, locality 99.2 → 91.7%; alone 80 → 100%,
73.3 → 65%, 91.3 → 99.5%.


SmolLM2-135M-Instruct (Llama, 30 layers, GGUF Q4_1 dequantised to float32)
=========================================================================

The embedded model's configuration (last-token key, last layer, statistics and preservation keys
from the facts table) failed here (issue 17: 10 capital edits, efficacy 70%, locality 0–4%,
generic text broken, > 1 h of statistics). What replaced it, each part measured:

* **Edit site, traced** (`edit_site`): restoring a 5-layer window of clean FFN outputs at the
  subject's last token (subject embeddings noised) brings back, of the clean answer probability,
  26% at layers 5–9 (the best window), 15–20% at 3–7 / 4–8 / 6–10, < 5% beyond layer 14; at the
  prompt's last token at most 14% (layers 21–25). So: subject key, layers 5–9. (The window
  holding layer 0 restores 98% — FFN 0 rebuilds the token's identity — and is never chosen.) On
  the embedded model the same trace gives the last token (layer 3, 42%; subject ≤ 0.02%), i.e.
  the configuration it was tuned with: its figures are unchanged.
* **Statistics** from text the model samples itself (`generic_text`: 24 openers × 4 samples ×
  64 tokens, seconds to sample; no facts table). Cold: trace + sampling + covariance of 5 layers
  134 s on this loaded machine (2 cores shared by six sessions), cached after that.
* **Solver** (6 capital edits, 6 other known capitals, 10 generic prompts' first 10 greedy tokens;
  ``chat`` = "Q: What is the capital of X?\nA: The capital is", never in the solve):

=============================================  ========  ====  ========  =======
configuration (6 edits, layers 5–9)            efficacy  chat  locality  fluency
=============================================  ========  ====  ========  =======
ridge λ = 1.5e4, 5 contexts, 2 rounds            6/6     6/6   3/3 *     1/3 *
ridge λ = 5e4, 2 contexts, 1 round               0/6     0/6    5/6     10/10
ridge λ = 1.5e4, 2 contexts, 1 round, clamp .75  0/6     1/6    6/6      9/10
exact (ΔW K = R, least E‖ΔW k‖²), 2 contexts     6/6     6/6    4/6      7/10
  + 8 encyclopedic openers in the corpus         6/6     5/6    5/6      6/10
ridge λ = 1.5e4, 5 contexts, 2 rounds, same      4/6     4/6    6/6      6/10
=============================================  ========  ====  ========  =======

(* an earlier probe: 4 locality prompts, 3 guard prompts.) The ridge form trades efficacy for
fluency along one curve (λ); the exact form (the update of least generic-key disturbance that
writes every edit key) reaches every target for the same fluency, so it is the subject default.
The fluency changes are near ties in the unedited model's greedy path (an oven at 400°F vs
325°F, a recipe step) that any update of layers 5–9 moves; a zero or 1e-3 random delta changes
none of 20 (checked), so the measure itself is exact.

A wider window (layers 3–12, exact) did not help: 6/6, 6/6, 5/6 locality (Norway → " London"),
6/10 fluency.

20 counterfactual capital edits together (``python bench/edit.py --model SmolLM2-135M-Instruct.Q4_1.gguf
--edits 20 --relations capital --threads 1 --hparams fluency_bound=1.0``; the model states 59
capitals of the facts table's countries, so 20 edits and the 39 others as locality; paraphrases:
three phrasings plus the chat template's question, none in the solve; fluency: 20 generic
prompts' first 10 greedy tokens; perplexity of a held-out paragraph; machine loaded by five
other sessions):

==============================  ========  ========  ==========  ========  =======  =========
stage (exact, layers 5–9)       efficacy  para all  para known  locality  fluency  ppl ratio
==============================  ========  ========  ==========  ========  =======  =========
session                           100.0%     70.0%       82.8%     51.3%    40.0%     1.0624
COMPILE → transformers            100.0%     70.0%       82.8%     51.3%    40.0%     1.0624
3 edits, ridge λ = 1.5e4, 2 rds   100.0%     75.0%       81.8%     89.3%    70.0%     1.0073
==============================  ========  ========  ==========  ========  =======  =========

The second relation, 20 counterfactual official-language edits (``--relations language``: the
model states 85 of the table's languages via "The official language of X is"; 60 others as
locality):

==============================  ========  ========  ==========  ========  =======  =========
stage (exact, layers 5–9)       efficacy  para all  para known  locality  fluency  ppl ratio
==============================  ========  ========  ==========  ========  =======  =========
session                           100.0%     90.0%       91.2%     45.0%    35.0%     1.0498
COMPILE → transformers            100.0%     90.0%       91.2%     45.0%    35.0%     1.0497
==============================  ========  ========  ==========  ========  =======  =========

Statistics (trace + sampling + covariance, cold) 134 s; one edit 34.7 s (20.7 s for a language
fact; cached statistics,
fluency guard included, loaded machine); DELETE of that edit restores bit-identical logits.
Efficacy, paraphrases and the transformers round trip meet the targets; locality and fluency
did not: at 20 edits the exact update writes along what the countries' subject keys share, and
text sampled from generic openers holds too few entity names for C to protect that direction
(MEMIT's Wikipedia statistics do). The locality misses were almost all to " the" (Hungary
" Budapest" → " the"), not to an edited target: every other capital was weakened to a near-tie.

Neighbour preservation (`knowledge.neighbours`): the subject keys of the edited entities'
nearest vocabulary names (input-embedding cosine; for these 20 countries the model's own
embedding lists other countries and nationalities first) added to C with weight μ, same δ, same
batch (an experiment harness on the 20-edit capital batch above; "held-out" = the locality
countries not among the 100 neighbours):

=================================================  ========  ========  ========  =======  =========
configuration (exact, layers 5–9)                  efficacy  locality  held-out  fluency  ppl ratio
=================================================  ========  ========  ========  =======  =========
no neighbours (the table above)                      100.0%     51.3%     18/37    40.0%     1.0624
10 names the model lists after "A, B, C, D,", μ=1    100.0%     61.5%     22/37    45.0%     1.0505
100 embedding neighbours, μ = 10                     100.0%     94.9%     18/20    25.0%     1.0403
100 embedding neighbours, μ = 100                    100.0%     94.9%     18/20    10.0%     1.0322
μ = 10, C ridge 1e-2 (the default)                   100.0%     94.9%     18/20    30.0%     1.0377
μ = 10, C ridge 1e-1                                 100.0%     89.7%     17/20    25.0%     1.0220
μ = 10, δ × 0.7                                      100.0%     94.9%     18/20    30.0%     1.0270
no neighbours, δ × 0.3                                10.0%     94.9%         —    70.0%     1.0193
no neighbours, δ × 0.1                                 0.0%     97.4%         —    95.0%     1.0079
=================================================  ========  ========  ========  =======  =========

The default through the product path (`python bench/edit.py --model SmolLM2-135M-Instruct.Q4_1.gguf
--edits 20 --hparams fluency_bound=1.0`; neighbour keys taken once on the unedited model after the
same generic prefixes as the edit's keys; load average ≈ 3 on 2 cores):

==============================  ========  ========  ==========  ========  =======  =========
stage (exact, layers 5–9)       efficacy  para all  para known  locality  fluency  ppl ratio
==============================  ========  ========  ==========  ========  =======  =========
session                           100.0%     71.2%       82.8%     97.4%    50.0%     0.9810
COMPILE → transformers            100.0%     71.2%       82.8%     97.4%    50.0%     0.9810
==============================  ========  ========  ==========  ========  =======  =========

The second relation, 20 official-language edits (``--relations language``, quiet machine):

==============================  ========  ========  ==========  ========  =======  =========
stage (exact, layers 5–9)       efficacy  para all  para known  locality  fluency  ppl ratio
==============================  ========  ========  ==========  ========  =======  =========
session                           100.0%     88.8%       94.7%     86.7%    50.0%     1.0027
COMPILE → transformers            100.0%     88.8%       94.7%     86.7%    50.0%     1.0027
==============================  ========  ========  ==========  ========  =======  =========

(locality 45.0%, fluency 35%, ppl +5.0% before the neighbours; the 20-fact batch 51.3 s, one
fact 6.9 s, quiet machine, cached statistics.)

Statistics (cold, trace + sampling + covariance) 269.5 s at load ≈ 12; one edit 53.4 s at load
≈ 3 (neighbour keys included; before the subject-key capture stopped its forward at the top
edited layer); DELETE restores bit-identical logits. Without `fluency_bound=1.0` the default
guard refuses this batch (5 of its 8 prompts change), as it should.

Fluency is the open gap: the changed generic prompts differ from their 2nd–5th token on (real
changes, not a late near-tie), and the share scales with δ (δ × 0.1: 95% unchanged, but no edit
holds), so it is the generic leakage of a δ large enough to override the old answer: E‖ΔW k‖²
over generic keys = tr(R (KᵀC⁻¹K)⁻¹ Rᵀ), which C from 6k sampled tokens cannot make small in a
576-wide model. Ridge shrinkage of C lowers perplexity but not the flips. Next to measure: a
larger sampled corpus (the capture now stops at the top edited layer, a third of the cost),
more layers for a smaller per-layer R, and a KL term on generic text in δ's objective.

Neuron edits (the default for subject keys since stop 26, `knowledge.memit_neurons`). The
leakage above is linear: ΔW k is non-zero for every generic key k that overlaps the subjects'
keys. Measured on the 20-edit batch, the held-out generic tokens (the fluency prompts'
continuations) leaked 1.6–2× more than the sampled corpus C was fitted on (mean ‖ΔW k‖ 7.5 vs
4.8 at layer 5), so a better C alone could not close it. A gated neuron can be silent instead:
at every layer 3–11 a ridge least-squares read-out of the FFN input separated each edited
subject (its prompt after the sampled prefixes) from all ~33k held-out negative tokens (the
fluency continuations, the locality prompts; 3 of 32,840 above 0, the mean maximum −0.3 against
+1 on the subject). One neuron per fact at the top traced layer, gate = 30 × that read-out,
down = δ / its activation, same δ, same batch (the harness):

=================================================  ========  ========  ========  =======  =========
configuration (same δ as above)                    efficacy  para all  locality  fluency  ppl ratio
=================================================  ========  ========  ========  =======  =========
ΔW_down, 100 neighbours, μ = 10 (the old default)    100.0%     70.0%     94.9%    25.0%     1.0368
20 least-used neurons of layer 9 replaced            100.0%     88.0%     94.9%    90.0%     1.0048
  same, down × 2                                     100.0%     80.0%     94.9%    90.0%     1.0048
20 neurons added at layer 9 (the default)            100.0%     86.0%     97.4%   100.0%     1.0000
  same, down × 0 (the neurons alone)                   0.0%      0.0%    100.0%   100.0%     1.0000
=================================================  ========  ========  ========  =======  =========

Replacing existing neurons (no change of shape) cost 10% fluency by itself, so the edit adds
them: the overlay runs them beside the layer's features, and COMPILE grows every layer's FFN by
the largest number any layer adds (zero rows elsewhere; HF configs have one intermediate size).

The default through the product path (`python bench/edit.py --model SmolLM2-135M-Instruct.Q4_1.gguf
--edits 20`, the default fluency guard on; load average 9–15 on 2 cores):

==============================  ========  ========  ==========  ========  =======  =========
stage (neurons at layer 9)      efficacy  para all  para known  locality  fluency  ppl ratio
==============================  ========  ========  ==========  ========  =======  =========
capital, session                  100.0%     67.5%       81.0%    100.0%   100.0%     1.0000
capital, COMPILE → transformers   100.0%     67.5%       81.0%    100.0%   100.0%     1.0000
language, session                 100.0%     90.0%       93.0%    100.0%   100.0%     1.0000
language, COMPILE → transformers  100.0%     90.0%       93.0%    100.0%   100.0%     1.0000
==============================  ========  ========  ==========  ========  =======  =========

A first version also fired on the name alone at a prompt's first position (capital paraphrases
83.8% / 89.7% known, language fluency 95%). In the 2-edit test batch its gate then fired on
whatever word opened a prompt ("Water boils at" → "1,800 degrees"), and a δ at the first
position does not carry anyway (the attention sink): "France's capital city is" kept its answer
with the gate fully on. So the positives never sit at position 0 and 1,000 vocabulary words,
each opening a prompt, are negatives: the first-position paraphrase "{X}'s capital city is" is
lost (the table above), nothing else moved.

Statistics (cold: causal trace, sampling, the generic inputs' Gram) 89.5 s at load ≈ 15 (114 s
wall / 137 s CPU in a separate timing at load 12.7); one edit 23.7–32.5 s wall at load 12.9
(30–39 s CPU over 2 threads); DELETE restores bit-identical logits.

"""
