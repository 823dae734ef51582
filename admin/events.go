// Package admin is vgw's operator interface: the vgw.admin.v1.Admin gRPC
// service that grpcurl drives, and the HTTP pages monitoring reads
// (/metrics, /status, /healthz, /readyz), over the GPU manager, the xDS
// server and the admission decisions.
package admin

import (
	"strconv"
	"sync"
	"time"
)

// Event is one lifecycle event, as WatchEvents streams it.
type Event struct {
	Time   time.Time
	Kind   string
	Model  string
	Detail string
}

// Hub fans events out to watchers. A watcher too slow to keep up loses
// events rather than slowing their source (the manager's loop must not
// block), and is told how many it lost.
type Hub struct {
	mu       sync.Mutex
	watchers map[*watcher]struct{}
}

type watcher struct {
	model   string
	ch      chan Event
	dropped int // guarded by Hub.mu
}

// NewHub returns a hub with no watchers.
func NewHub() *Hub { return &Hub{watchers: map[*watcher]struct{}{}} }

// watcherBuffer is how many events a watcher may lag behind.
const watcherBuffer = 256

// Publish sends e to every watcher that wants it. It never blocks.
func (h *Hub) Publish(e Event) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for w := range h.watchers {
		// An event about no model in particular (an Envoy's NACK, requests
		// for unknown models) goes to every watcher.
		if w.model != "" && e.Model != "" && w.model != e.Model {
			continue
		}
		if w.dropped > 0 {
			select {
			case w.ch <- Event{Time: e.Time, Kind: "dropped", Detail: strconv.Itoa(w.dropped) + " events were dropped: this watcher was too slow"}:
				w.dropped = 0
			default:
				w.dropped++
				continue
			}
		}
		select {
		case w.ch <- e:
		default:
			w.dropped++
		}
	}
}

// Watch subscribes to the events for model ("" for all), and those about
// no model in particular, until stop is called.
func (h *Hub) Watch(model string) (events <-chan Event, stop func()) {
	w := &watcher{model: model, ch: make(chan Event, watcherBuffer)}
	h.mu.Lock()
	h.watchers[w] = struct{}{}
	h.mu.Unlock()
	return w.ch, func() {
		h.mu.Lock()
		delete(h.watchers, w)
		h.mu.Unlock()
	}
}
