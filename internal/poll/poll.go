// Package poll waits, in tests, for what must happen: it polls a
// condition until it holds, and fails the test only when a deadline that
// only a hang reaches has passed, however slow the machine (a busy CI
// runner with two cores, the race detector). What must not happen is
// checked otherwise, over a short while, which cannot fail falsely.
package poll

import (
	"testing"
	"time"
)

// Long bounds a wait for what must happen.
const Long = time.Minute

// interval is how often a condition is polled: often enough that a test
// waits at most a few milliseconds past the moment it holds.
const interval = 2 * time.Millisecond

// Until polls cond until it holds, and fails t, saying what it waited
// for, once Long has passed.
func Until(t testing.TB, what string, cond func() bool) {
	t.Helper()
	Within(t, Long, what, cond)
}

// Within is Until with a deadline of its own.
func Within(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(interval) // polling, not synchronisation
	}
}
