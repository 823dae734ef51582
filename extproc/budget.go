package extproc

import (
	"bytes"
	"math"
	"sync/atomic"
	"time"
)

// A budget is a tenant's allowance of requests or tokens per minute, over
// all models: a token bucket that holds a minute's worth and refills at
// the rate, kept as the generic cell rate algorithm does (ITU-T I.371),
// in one atomic word: the time at which everything spent so far will
// have been refilled. Nothing is allocated or locked to spend from it.
type budget struct {
	rate int           // per minute, as configured
	per  time.Duration // the time one unit takes to refill
	tat  atomic.Int64  // since budgetEpoch (ticks)
}

// budgetWindow is how much a budget holds: a minute's worth.
const budgetWindow = time.Minute

// budgetEpoch is what budgets count time from: times are taken as
// durations since it, on the monotonic clock where both have one, so
// that a step of the wall clock (NTP, a VM resumed) neither refuses
// tenants for as long nor refills them early.
var budgetEpoch = time.Now()

// ticks is now as a budget counts it.
func ticks(now time.Time) int64 { return int64(now.Sub(budgetEpoch)) }

// longAgo is where a new budget's time starts: full, whatever the
// times it is given (tests give wall-clock ones, before the epoch).
const longAgo = math.MinInt64 / 4

func newBudget(perMinute int) *budget {
	b := &budget{rate: perMinute, per: budgetWindow / time.Duration(perMinute)}
	b.tat.Store(longAgo)
	return b
}

// take spends one unit at now if the budget has it, and otherwise says
// how long until it will.
func (b *budget) take(now time.Time) (wait time.Duration) {
	t := ticks(now)
	for {
		tat := b.tat.Load()
		next := max(tat, t) + int64(b.per)
		if over := next - t - int64(budgetWindow); over > 0 {
			return time.Duration(over)
		}
		if b.tat.CompareAndSwap(tat, next) {
			return 0
		}
	}
}

// empty says how long until the budget has anything left at all, 0 when
// it has: for a budget spent only once what a request cost is known.
func (b *budget) empty(now time.Time) (wait time.Duration) {
	return max(0, time.Duration(b.tat.Load()-ticks(now)-int64(budgetWindow)))
}

// spend takes n units at now whether or not the budget has them (a
// budget in debt refuses requests until it has refilled), or gives back
// -n of them. One spend is at most an hour's worth: a response that
// claims more (a server gone wrong) leaves the tenant an hour in debt,
// not for ever.
func (b *budget) spend(now time.Time, n int64) {
	if n == 0 {
		return
	}
	n = min(n, int64(b.rate)*60)
	t := ticks(now)
	for {
		tat := b.tat.Load()
		next := max(tat, t) + n*int64(b.per)
		if n < 0 {
			next = tat + n*int64(b.per) // a refund of what was taken
		}
		if b.tat.CompareAndSwap(tat, next) {
			return
		}
	}
}

// A usageMeter reads how many tokens a response cost from the usage the
// model server reports at its end: the last "total_tokens" in the body,
// in a JSON answer's usage object or a stream's last event (vLLM reports
// one when the request asks, stream_options.include_usage, which vgw
// adds to the streamed requests of tenants with a token budget). It
// reads the body chunk by chunk as Envoy sends it, a figure split across
// two chunks included, and keeps no more than a few bytes of it.
type usageMeter struct {
	total  int64 // the last figure read; -1 before one
	events int64 // server-sent events with a body, for the estimate
	tail   [usageTail]byte
	n      int // bytes of tail in use
}

// usageTail is how much of a chunk's end is kept to find a figure that
// the next chunk completes: the key, up to 8 spaces and colons, and 18
// digits.
const usageTail = 48

var (
	totalTokensKey = []byte(`"total_tokens"`)
	eventPrefix    = []byte("data: {")
)

func newUsageMeter() usageMeter { return usageMeter{total: -1} }

// read takes the next chunk of the response body.
func (m *usageMeter) read(chunk []byte) {
	if len(chunk) == 0 {
		return
	}
	// A figure that starts in the kept tail ends in this chunk: read the
	// two together, as far as a figure reaches.
	if m.n > 0 {
		var joined [2 * usageTail]byte
		j := append(append(joined[:0], m.tail[:m.n]...), chunk[:min(len(chunk), usageTail)]...)
		if v, ok := lastTotal(j, m.n); ok {
			m.total = v
		}
	}
	if v, ok := lastTotal(chunk, 0); ok {
		m.total = v
	}
	m.events += int64(bytes.Count(chunk, eventPrefix))
	if len(chunk) >= usageTail {
		m.n = copy(m.tail[:], chunk[len(chunk)-usageTail:])
	} else {
		keep := min(m.n, usageTail-len(chunk))
		copy(m.tail[:], m.tail[m.n-keep:m.n])
		m.n = keep + copy(m.tail[keep:], chunk)
	}
}

// lastTotal finds the last complete `"total_tokens": N` in b, complete
// meaning that what ends the number is in b, at or after from: a figure
// ended before from was read with the chunk it ended in. It searches
// forward, as bytes.Index does fastest, a chunk seldom holding one.
func lastTotal(b []byte, from int) (total int64, ok bool) {
	for pos := 0; ; {
		i := bytes.Index(b[pos:], totalTokensKey)
		if i < 0 {
			return total, ok
		}
		j := pos + i + len(totalTokensKey)
		pos += i + 1 // keys may overlap: "total_tokens"total_tokens"
		for k := 0; j < len(b) && k < 8 && (b[j] == ' ' || b[j] == ':'); k++ {
			j++
		}
		k := j
		var v int64
		for k < len(b) && b[k] >= '0' && b[k] <= '9' && k-j < 18 {
			v = v*10 + int64(b[k]-'0')
			k++
		}
		// A number cut off by the end of b is not complete.
		if k > j && k < len(b) && k >= from {
			total, ok = v, true
		}
	}
}

// tokens is what the response cost: the usage it reported, or, where it
// reported none (a client that turned usage off, a stream cut short), an
// estimate: one token per event streamed, and one per four bytes of the
// prompt, promptBytes (0 for a request whose body is not its prompt, such
// as an audio upload).
func (m *usageMeter) tokens(promptBytes int) int64 {
	if m.total >= 0 {
		return m.total
	}
	return m.events + int64(promptBytes/4)
}
