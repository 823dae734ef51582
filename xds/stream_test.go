package xds

import (
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
)

// TestStreamSilence: a stream is silent only when a version it was sent
// has waited for an answer longer than the timeout, counted from when
// that version was sent. An Envoy that answers every version promptly
// while new ones keep coming, never all caught up at once, is not silent
// (counted from when it was last caught up, it would have been).
func TestStreamSilence(t *testing.T) {
	const timeout = 15 * time.Second
	t0 := time.Unix(1000, 0)
	cds, eds := resource.ClusterType, resource.EndpointType
	type step struct {
		at     time.Duration
		send   string // type sent, with version
		answer string // type answered, up to version
		v      uint64
	}
	for _, tc := range []struct {
		name       string
		steps      []step
		now        time.Duration
		wantSince  time.Duration // -1: nothing owed
		wantSilent bool
	}{
		{name: "answered", steps: []step{{0, eds, "", 1}, {time.Second, "", eds, 1}}, now: time.Minute, wantSince: -1},
		{name: "churn, each answered in time", steps: []step{
			{0, eds, "", 1}, {10 * time.Second, cds, "", 2}, {11 * time.Second, "", eds, 1},
			{20 * time.Second, eds, "", 3}, {21 * time.Second, "", cds, 2}, {30 * time.Second, cds, "", 4}, {31 * time.Second, "", eds, 3},
		}, now: 40 * time.Second, wantSince: 30 * time.Second},
		{name: "one left unanswered", steps: []step{{0, eds, "", 1}, {time.Second, cds, "", 2}, {2 * time.Second, "", cds, 2}}, now: 20 * time.Second, wantSince: 0, wantSilent: true},
		{name: "a later version answers the earlier", steps: []step{{0, eds, "", 1}, {time.Second, eds, "", 2}, {2 * time.Second, "", eds, 2}}, now: time.Minute, wantSince: -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := &adsStream{node: "e", acked: map[string]uint64{}, sent: map[string]uint64{}, nacked: map[string]uint64{}, unanswered: map[string][]sentVersion{}}
			for _, s := range tc.steps {
				if s.send != "" {
					st.sentOne(s.send, s.v, t0.Add(s.at))
				} else {
					st.acked[s.answer] = s.v
					st.answeredUpTo(s.answer, s.v, t0.Add(s.at), timeout)
				}
			}
			since := st.waitingSince()
			switch {
			case tc.wantSince < 0 && !since.IsZero():
				t.Errorf("owes since %v, want nothing owed", since.Sub(t0))
			case tc.wantSince >= 0 && !since.Equal(t0.Add(tc.wantSince)):
				t.Errorf("owes since %v, want %v", since.Sub(t0), tc.wantSince)
			}
			silent := !since.IsZero() && t0.Add(tc.now).Sub(since) > timeout
			if silent != tc.wantSilent {
				t.Errorf("silent %v at %v, want %v", silent, tc.now, tc.wantSilent)
			}
		})
	}
}
