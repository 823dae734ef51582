//go:build race

package extproc_test

// raceEnabled reports whether the race detector is on: it slows the server
// and the Envoy harness, which share two cores, about tenfold.
const raceEnabled = true
