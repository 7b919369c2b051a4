// Threading for the CPU engine: OpenMP when the build found it, else serial.
#pragma once

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace bitnet {

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline bool have_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

// fn(task) for task in [0, n_tasks) over n_threads: split statically, or with `guided` on OpenMP's
// guided schedule (halving contiguous chunks, the last ones small: a thread that finishes early
// takes over the rest of a slower one's tasks). fn must not throw.
template <class F>
void parallel_for(int64_t n_tasks, int n_threads, const F& fn, bool guided = false) {
#ifdef _OPENMP
  if (n_threads > 1 && n_tasks > 1) {
    if (guided) {
#pragma omp parallel for num_threads(n_threads) schedule(guided)
      for (int64_t t = 0; t < n_tasks; ++t) fn(t);
    } else {
#pragma omp parallel for num_threads(n_threads) schedule(static)
      for (int64_t t = 0; t < n_tasks; ++t) fn(t);
    }
    return;
  }
#endif
  (void)n_threads;
  (void)guided;
  for (int64_t t = 0; t < n_tasks; ++t) fn(t);
}

}  // namespace bitnet
