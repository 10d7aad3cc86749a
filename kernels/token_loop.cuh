// The device-side token loop's last step, shared by the kernels that pick a
// step's token (the LM head's argmax, or the sampler): record the token and
// move the loop to the next position, so the host never has to synchronise
// between steps.
#pragma once

#include "common.cuh"

namespace qmk {

struct TokenLoop {
    DecodeState* state;
    unsigned int* tokens;       // context + 1
    unsigned int* predicted;    // the token picked at each position, context
    unsigned int* host_tokens;  // pinned, mapped host copy of `predicted`, or null
    unsigned int context;

    __device__ bool is_eos(unsigned int token) const {
        for (unsigned int i = 0; i < state->n_eos && i < 4; ++i)
            if (state->eos_ids[i] == token) return true;
        return false;
    }

    // Runs once per step, on one thread: publishes the token and moves the
    // loop to the next position.
    __device__ void advance(unsigned int token) const {
        const unsigned int pos = state->pos;
        predicted[pos] = token;
        if (host_tokens) {
            volatile unsigned int* host = host_tokens;
            host[pos] = token;
            __threadfence_system();
        }
        const unsigned int next = pos + 1;
        if (next >= state->n_fixed) {
            tokens[next] = token;
            if (state->stop_on_eos && is_eos(token)) state->done = 1;
        }
        if (next >= context) state->done = 1;  // the cache is full
        state->pos = next;
    }
};

}  // namespace qmk
