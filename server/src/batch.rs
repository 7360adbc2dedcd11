//! Continuous batching for `/openai/v1`: one scheduler thread per loaded model owns its running
//! batch of sequences and runs them together, one [`Session::forward_ragged`] step at a time
//! (every linear reads its weights once per step for all sequences).
//!
//! Between two steps the scheduler drops sequences whose client went away (the receiver of
//! their updates is gone: a dropped SSE stream or a dropped request future), ends those past
//! their deadline (finish reason [`FinishReason::Deadline`]), answers finished ones, and lets
//! waiting requests join in arrival order. A joining request's whole prompt goes into the next
//! step beside the running sequences' decode tokens (each into its own KV cache), so prompts
//! that arrive together are prefilled in one pass over the weights instead of one pass each,
//! and the running sequences keep decoding meanwhile; at most [`PREFILL_TOKENS_PER_STEP`]
//! prompt tokens join one step (a longer prompt joins a step alone), which bounds how long a
//! step holds up the running sequences. A request joins while the batch has fewer than `slots`
//! sequences and the KV caches reserved (each sequence reserves `prompt + max_tokens`
//! positions up front, so it never grows) fit in the memory budget; [`Scheduler::submit`]
//! refuses one that could never fit.
//!
//! A batch of one is exactly the single-sequence computation, so a request alone gets what
//! `espalier generate` prints. In a larger batch the linears may run other kernels (GEMM
//! instead of GEMV, another tile for more rows), whose sums may differ in the last bits (and
//! bf16 weights multiply bf16-rounded activations, as prefill does). On AVX512-BF16 with
//! VBMI2, steps of up to 3 sequences of a bf16 model of dense and bitmap layers keep each
//! sequence's GEMV arithmetic, so they too give what each request gets alone.
//!
//! [`Session::forward_ragged`]: espalier_engine::Session::forward_ragged

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use espalier::generate::{FinishReason, GenerateError, GenerateSpec, Generator, Sequence};
use espalier_engine::TokenLogprob;
use tokio::sync::mpsc::UnboundedSender;

use crate::daemon::Daemon;

/// Prompt tokens that may join one step at most (unless a single prompt is longer): a step of
/// 16 SmolLM2 prompts of 64 tokens is one 1024-row pass; more rows gain little GEMM efficiency
/// and hold up the running sequences' next token for longer.
pub const PREFILL_TOKENS_PER_STEP: usize = 2048;

/// What a generation sends its request.
#[derive(Debug)]
pub enum Update {
    /// The prompt's scores after the step that prefilled it (requests with `score_prompt`):
    /// each prompt token after the first, with its log-probability.
    Prompt(Vec<TokenLogprob>),
    /// Newly settled text, with the log-probabilities of the tokens chosen since the last
    /// text (when the request asked for them).
    Text {
        /// The text.
        text: String,
        /// Their log-probabilities.
        logprobs: Vec<TokenLogprob>,
    },
    /// The end: the whole generation, or why it failed.
    Done(Result<Finished, JobError>),
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The whole text.
    pub text: String,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Why it ended.
    pub finish: FinishReason,
    /// The log-probabilities of chosen tokens that no [`Update::Text`] carried (an EOS that
    /// ended the reply), when asked for.
    pub logprobs: Vec<TokenLogprob>,
}

/// Why a generation was not run or failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JobError {
    /// The request's settings do not work with the model.
    #[error("{0}")]
    Settings(String),
    /// Its KV cache alone is larger than the whole budget.
    #[error("{0}")]
    TooLarge(String),
    /// The deadline passed before it could start.
    #[error("{0}")]
    Deadline(String),
    /// The prompt does not fit the model (a token id outside its vocabulary).
    #[error("{0}")]
    Prompt(String),
    /// The forward pass failed.
    #[error("{0}")]
    Failed(String),
    /// The scheduler is gone (the daemon is stopping).
    #[error("the model's scheduler has stopped")]
    Stopped,
}

/// One request for the scheduler.
pub struct Job {
    /// Prompt tokens (checked against the context by the caller).
    pub prompt: Vec<u32>,
    /// Settings; EOS and context come from the model.
    pub spec: GenerateSpec,
    /// Score the prompt's tokens with this many alternatives each (the API's `echo` with
    /// `logprobs`), in the step that prefills it.
    pub score_prompt: Option<usize>,
    /// Where text and the end go; when its receiver is dropped the generation stops.
    pub updates: UnboundedSender<Update>,
    submitted: Instant,
    kv_bytes: usize,
}

/// How much a scheduler runs at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Sequences in the running batch at most.
    pub slots: usize,
    /// Bytes of KV cache the running batch may reserve.
    pub kv_bytes: usize,
    /// Longest a request may take from submission.
    pub deadline: Duration,
}

/// The handle of one model's scheduler thread; dropping it (with the model) ends the thread
/// once its running sequences are done.
pub struct Scheduler {
    jobs: std::sync::Mutex<std_mpsc::Sender<Job>>,
    generator: Arc<Generator>,
    limits: Limits,
}

impl Scheduler {
    /// Starts the scheduler thread of `generator`.
    pub fn start(
        generator: Arc<Generator>,
        limits: Limits,
        daemon: Arc<Daemon>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std_mpsc::channel();
        let g = generator.clone();
        std::thread::Builder::new()
            .name("espalier-batch".into())
            .spawn(move || Worker::new(g, limits, daemon).run(rx))?;
        Ok(Scheduler {
            jobs: std::sync::Mutex::new(tx),
            generator,
            limits,
        })
    }

    /// Bytes of KV cache a request reserves.
    pub fn kv_bytes(&self, prompt: usize, max_tokens: usize) -> usize {
        let tokens = Sequence::reserved_tokens(prompt, max_tokens, self.generator.context);
        tokens
            .max(16)
            .saturating_mul(self.generator.session.kv_bytes_per_token())
    }

    /// Queues a generation; its text and end arrive on `updates`. Refuses one whose KV cache
    /// alone exceeds the budget.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        spec: GenerateSpec,
        score_prompt: Option<usize>,
        updates: UnboundedSender<Update>,
    ) -> Result<(), JobError> {
        let kv_bytes = self.kv_bytes(prompt.len(), spec.max_tokens);
        if kv_bytes > self.limits.kv_bytes {
            let dtype = self.generator.session.kv_dtype();
            let halve = if dtype == espalier_engine::KvDtype::F32 {
                " (or set kv_cache = \"f16\" to halve it)"
            } else {
                ""
            };
            return Err(JobError::TooLarge(format!(
                "a prompt of {} tokens with max_tokens {} needs {} MiB of {dtype} KV cache; the model's budget (kv_cache_mib) is {} MiB: ask for fewer tokens{halve}",
                prompt.len(),
                spec.max_tokens,
                kv_bytes.div_ceil(1 << 20),
                self.limits.kv_bytes >> 20
            )));
        }
        let job = Job {
            prompt,
            spec,
            score_prompt,
            updates,
            submitted: Instant::now(),
            kv_bytes,
        };
        self.jobs
            .lock()
            .map_err(|_| JobError::Stopped)?
            .send(job)
            .map_err(|_| JobError::Stopped)
    }
}

/// A sequence of the running batch.
struct Running {
    seq: Sequence,
    /// The prompt until the step that prefills it (then empty): that step's input for this
    /// sequence, instead of its last token.
    prompt: Vec<u32>,
    /// Alternatives per prompt token when the prompt is to be scored.
    score_prompt: Option<usize>,
    updates: UnboundedSender<Update>,
    deadline: Instant,
    kv_bytes: usize,
    /// Failed during a step: leaves at the next chance with this error as its answer.
    failed: Option<JobError>,
}

/// The scheduler thread's state.
struct Worker {
    generator: Arc<Generator>,
    limits: Limits,
    daemon: Arc<Daemon>,
    waiting: VecDeque<Job>,
    running: Vec<Running>,
    reserved: usize,
}

impl Worker {
    fn new(generator: Arc<Generator>, limits: Limits, daemon: Arc<Daemon>) -> Self {
        Worker {
            generator,
            limits,
            daemon,
            waiting: VecDeque::new(),
            running: Vec::new(),
            reserved: 0,
        }
    }

    fn run(mut self, jobs: std_mpsc::Receiver<Job>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                // Idle: sleep until a request comes (or the model is dropped).
                match jobs.recv() {
                    Ok(job) => self.enqueue(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = jobs.try_recv() {
                self.enqueue(job);
            }
            self.drop_stale_waiting();
            self.leave();
            self.join();
            self.leave();
            if !self.running.is_empty() {
                self.step();
            }
        }
    }

    fn enqueue(&mut self, job: Job) {
        self.daemon.metrics.add_generation_waiting(1);
        self.waiting.push_back(job);
    }

    /// Forgets waiting requests whose client left, and refuses those past their deadline.
    fn drop_stale_waiting(&mut self) {
        let now = Instant::now();
        let deadline = self.limits.deadline;
        let metrics = &self.daemon.metrics;
        self.waiting.retain(|job| {
            let keep = if job.updates.is_closed() {
                metrics.inc_generation_abandoned();
                false
            } else if now.duration_since(job.submitted) >= deadline {
                let _ = job.updates.send(Update::Done(Err(JobError::Deadline(format!(
                    "the request waited {} s for a batch slot, its deadline (generation_deadline_s)",
                    deadline.as_secs()
                )))));
                false
            } else {
                true
            };
            if !keep {
                metrics.add_generation_waiting(-1);
            }
            keep
        });
    }

    /// Moves waiting requests into the batch, in arrival order, while slots, the KV budget and
    /// the step's prompt tokens allow; their prompts are prefilled by the next step. An empty
    /// batch always takes the first (`submit` checked it fits alone), and a step always takes
    /// one prompt however long.
    fn join(&mut self) {
        let mut prompt_tokens = 0;
        while self.running.len() < self.limits.slots {
            let Some(job) = self.waiting.front() else {
                break;
            };
            if !self.running.is_empty() && self.reserved + job.kv_bytes > self.limits.kv_bytes {
                break;
            }
            if prompt_tokens > 0 && prompt_tokens + job.prompt.len() > PREFILL_TOKENS_PER_STEP {
                break;
            }
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            self.daemon.metrics.add_generation_waiting(-1);
            match self.start(&job) {
                Ok(seq) => {
                    // Counted as running from here: the step sends its first text, and a
                    // client that reads it must find its sequence running.
                    self.daemon.metrics.add_generation_running(1);
                    prompt_tokens += job.prompt.len();
                    self.reserved += job.kv_bytes;
                    self.running.push(Running {
                        seq,
                        prompt: job.prompt,
                        score_prompt: job.score_prompt,
                        deadline: job.submitted + self.limits.deadline,
                        kv_bytes: job.kv_bytes,
                        updates: job.updates,
                        failed: None,
                    });
                }
                Err(e) => {
                    let _ = job.updates.send(Update::Done(Err(e)));
                }
            }
        }
    }

    /// The sequence of a request: its prompt and settings checked against the model (a step
    /// that failed would end every sequence in it) and its KV cache reserved.
    fn start(&self, job: &Job) -> Result<Sequence, JobError> {
        let g = &self.generator;
        g.session
            .check_tokens(&job.prompt, 0)
            .map_err(|e| JobError::Prompt(e.to_string()))?;
        let spec = GenerateSpec {
            eos: g.eos.clone(),
            context: g.context,
            ..job.spec.clone()
        };
        Sequence::new(&g.session, &job.prompt, &spec).map_err(job_error)
    }

    /// One step for every running sequence: the prompt of those that joined since the last
    /// step, the last token of the others.
    fn step(&mut self) {
        let g = &self.generator;
        // A prompt is scored in the step that prefills it (the one step its prompt is here).
        let score: Vec<Option<usize>> = self
            .running
            .iter()
            .map(|r| r.score_prompt.filter(|_| !r.prompt.is_empty()))
            .collect();
        let chunks: Vec<Vec<u32>> = self
            .running
            .iter_mut()
            .map(|r| match r.seq.last_token() {
                Some(t) if r.prompt.is_empty() => vec![t],
                _ => std::mem::take(&mut r.prompt),
            })
            .collect();
        let chunk_refs: Vec<&[u32]> = chunks.iter().map(Vec::as_slice).collect();
        let mut caches: Vec<&mut espalier_engine::KvCache> =
            self.running.iter_mut().map(|r| &mut r.seq.cache).collect();
        let logits = g
            .session
            .forward_ragged_scored(&chunk_refs, &mut caches, &score)
            .and_then(|(l, scores)| Ok((l.flatten_all()?.to_vec1::<f32>()?, scores)));
        let (logits, scores) = match logits {
            Ok(l) => l,
            Err(e) => {
                // A failed step leaves every cache of the batch unusable: end them all.
                for r in self.running.drain(..) {
                    // Counted out before the answer, so a client that has it never finds its
                    // sequence still running.
                    self.daemon.metrics.add_generation_running(-1);
                    let _ = r
                        .updates
                        .send(Update::Done(Err(JobError::Failed(e.to_string()))));
                }
                self.reserved = 0;
                return;
            }
        };
        let vocab = logits.len() / self.running.len();
        let rows = logits.chunks(vocab).zip(scores).zip(score);
        for (r, ((row, scores), scored)) in self.running.iter_mut().zip(rows) {
            if scored.is_some() {
                let _ = r.updates.send(Update::Prompt(scores));
            }
            // A request that only scores its prompt (`max_tokens` 0) chooses nothing.
            if !r.seq.wants_token() {
                continue;
            }
            match r.seq.accept(row, &g.tokenizer) {
                Ok(text) if !text.is_empty() => {
                    let logprobs = r.seq.take_logprobs();
                    let _ = r.updates.send(Update::Text { text, logprobs });
                }
                Ok(_) => {}
                Err(e) => {
                    r.failed = Some(job_error(e));
                }
            }
        }
    }

    /// Removes finished sequences (answering them), those whose client left, and ends those
    /// past their deadline.
    fn leave(&mut self) {
        let now = Instant::now();
        let metrics = &self.daemon.metrics;
        let mut freed = 0;
        self.running.retain_mut(|r| {
            let answer = if let Some(e) = r.failed.take() {
                Some(Err(e))
            } else if r.updates.is_closed() {
                if r.seq.finish().is_none() {
                    metrics.inc_generation_abandoned();
                }
                None
            } else {
                if r.seq.finish().is_none() && now >= r.deadline {
                    let text = r.seq.stop(FinishReason::Deadline);
                    if !text.is_empty() {
                        let logprobs = r.seq.take_logprobs();
                        let _ = r.updates.send(Update::Text { text, logprobs });
                    }
                }
                // A prompt still to prefill stays for its step even when nothing is to be
                // generated (`max_tokens` 0 only scores it), unless its deadline passed.
                let to_prefill =
                    !r.prompt.is_empty() && r.seq.finish() != Some(FinishReason::Deadline);
                if to_prefill || r.seq.wants_token() {
                    return true;
                }
                Some(Ok(Finished {
                    text: r.seq.text().to_string(),
                    prompt_tokens: r.seq.prompt_len(),
                    completion_tokens: r.seq.generated(),
                    finish: r.seq.finish().unwrap_or(FinishReason::Length),
                    logprobs: r.seq.take_logprobs(),
                }))
            };
            // Counted out before the answer goes: a client holding its reply must never find
            // its sequence still running (this thread would otherwise race that client).
            metrics.add_generation_running(-1);
            freed += r.kv_bytes;
            if let Some(answer) = answer {
                let _ = r.updates.send(Update::Done(answer));
            }
            false
        });
        self.reserved = self.reserved.saturating_sub(freed);
    }
}

fn job_error(e: GenerateError) -> JobError {
    match e {
        GenerateError::Settings(m) => JobError::Settings(m),
        e => JobError::Failed(e.to_string()),
    }
}
