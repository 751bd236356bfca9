// The step loops the cpu backend compiles with their absent terms known.
//
// A loop that reads a row's absent terms (Coefficients::absent) at run time evaluates
// every term and keeps or drops each with a blend: nine or more per vector of eight
// elements. With the table's absent terms as a constant they compile away: the DDIM and
// DPM++ 2M step loops ran half the instructions (callgrind), and the DDIM step on the
// CogVideoX latent took 0.43-0.49 ms instead of 0.77-1.09 ms on a 2-vCPU Intel Xeon, where
// a vblendvps costs two or three uops (2026-11-30). The schedulers' tables leave out few
// distinct sets of terms, so the loops for those sets are compiled here; any other set
// runs the run-time loop, which computes the same bits.
//
// An entry is the shape of a loop (step_chunk_* in ops_cpu.cpp: clip mode, history terms,
// noise, unclipped form of d) and its absent terms among those that loop reads
// (terms_read). tests/test_cpu_known_absent_terms.py steps the schedulers' common
// configurations through the cpu backend and fails, printing the entries to add here, where
// one of them would run the run-time loop.
#pragma once

#include <cstddef>
#include <cstdint>

#include "fused_sched/step_math.h"

namespace fused_sched::cpu {

// Bits 1 << column of the terms a loop of this shape reads (add_term's columns in
// step_math.h); a row's other absent bits cannot change what it computes.
constexpr uint32_t terms_read(Clip clip, int history, bool noise, bool unclipped_form) {
  uint32_t bits = (1u << kAX) | (1u << kAM) | (1u << kAL) | (1u << kPX) | (1u << kP0) | (1u << kPM) | (1u << kOX) |
                  (1u << kO0) | (1u << kOM);
  if (clip != Clip::kNone) bits |= 1u << kOC;
  if (history >= 1) bits |= 1u << kO1;
  if (history >= 2) bits |= 1u << kO2;
  if (noise) bits |= 1u << kON;
  if (unclipped_form) bits |= (1u << kUS) | (1u << kUX) | (1u << kUM);
  return bits;
}

template <Column... kColumns>
constexpr uint32_t columns = ((1u << kColumns) | ... | 0u);

struct KnownAbsentTerms {
  Clip clip;
  int history;
  bool noise;
  bool unclipped_form;
  uint32_t absent;
};

inline constexpr KnownAbsentTerms kKnownAbsentTerms[] = {
    // DDIM, DDIM inverse and CogVideoX DDIM (epsilon, v and sample prediction; clip_sample,
    // thresholding; eta > 0 draws noise).
    {Clip::kNone, 0, false, false, columns<kPX, kPM>},
    {Clip::kNone, 0, false, false, columns<kPX, kPM, kOX>},
    {Clip::kNone, 0, false, false, columns<kPX, kPM, kOM>},
    {Clip::kNone, 0, true, false, columns<kPX, kPM, kOX>},
    {Clip::kClamp, 0, false, false, columns<kPX, kPM, kOX, kOC>},
    {Clip::kClamp, 0, false, false, columns<kAX, kPX, kPM, kOC, kAL>},
    {Clip::kClamp, 0, true, false, columns<kPX, kPM, kOX, kOC>},
    {Clip::kClamp, 0, true, false, columns<kAX, kPX, kPM, kOC, kAL>},
    {Clip::kThreshold, 0, false, false, columns<kPX, kPM, kOX, kOC>},
    {Clip::kThreshold, 0, true, false, columns<kPX, kPM, kOX, kOC>},
    // DPM-Solver multistep and its inverse, CogVideoX DPM: dpmsolver++ and sde-dpmsolver++
    // (epsilon, v, sample and flow prediction; orders 1-3; thresholding), dpmsolver.
    {Clip::kNone, 0, false, false, columns<kPX, kP0, kO0>},
    {Clip::kNone, 0, false, false, columns<kPX, kPM, kOM, kAL>},
    {Clip::kNone, 0, true, false, columns<kPX, kPM, kOM>},
    {Clip::kNone, 1, false, false, columns<kPX, kP0, kO0>},
    {Clip::kNone, 1, false, false, columns<kPX, kPM, kOM>},
    {Clip::kNone, 1, false, false, columns<kPX, kPM, kOM, kAL>},
    {Clip::kNone, 1, true, false, columns<kPX, kPM, kOM>},
    // CogVideoX DPM's zero-SNR step back from T-1 weighs its history by 0 (O1 left out).
    {Clip::kNone, 1, true, false, columns<kPX, kPM, kOM, kO1>},
    {Clip::kNone, 2, false, false, columns<kPX, kPM, kOM>},
    {Clip::kThreshold, 0, false, false, columns<kPX, kPM, kOM, kOC>},
    {Clip::kThreshold, 0, false, false, columns<kAX, kPX, kPM, kOM, kOC, kAL>},
    {Clip::kThreshold, 1, false, false, columns<kPX, kPM, kOM, kOC>},
    {Clip::kThreshold, 1, false, false, columns<kAX, kPX, kPM, kOM, kOC, kAL>},
};

inline constexpr size_t kNumKnownAbsentTerms = sizeof(kKnownAbsentTerms) / sizeof(kKnownAbsentTerms[0]);

// Each entry names only terms its loop reads, and no entry is there twice: a wider set
// would never match, a repeated one would compile the same loop twice.
constexpr bool known_absent_terms_are_well_formed() {
  for (size_t i = 0; i < kNumKnownAbsentTerms; ++i) {
    const KnownAbsentTerms& e = kKnownAbsentTerms[i];
    if (e.unclipped_form && e.clip == Clip::kNone) return false;
    if ((e.absent & ~terms_read(e.clip, e.history, e.noise, e.unclipped_form)) != 0u) return false;
    for (size_t j = 0; j < i; ++j) {
      const KnownAbsentTerms& f = kKnownAbsentTerms[j];
      if (e.clip == f.clip && e.history == f.history && e.noise == f.noise && e.unclipped_form == f.unclipped_form &&
          e.absent == f.absent)
        return false;
    }
  }
  return true;
}
static_assert(known_absent_terms_are_well_formed(),
              "kKnownAbsentTerms: an entry names a term its loop does not read, or repeats another");

}  // namespace fused_sched::cpu
