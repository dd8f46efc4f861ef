/* The screen models: login form, lobby, connection state, and the container
 * that says which screen is shown. */
(function (ChatApp, Backbone, _) {
  'use strict';

  var models = ChatApp.models;

  // The login form: what was typed, the server's last refusal, and whether
  // we are waiting for an answer.
  var LoginModel = Backbone.Model.extend({
    defaults: { name: '', error: '', busy: false },

    submitted: function (name) {
      // Clearing the error first means the same refusal twice is still a
      // change, so the view re-renders for it.
      this.set({ name: name, error: '', busy: true });
    },

    refused: function (error) {
      this.set({ error: error, busy: false });
    }
  });

  // What the connection indicator shows.
  var ConnectionModel = Backbone.Model.extend({
    defaults: {
      state: 'connecting', // connecting | connected | relogin | disconnected | reconnecting | stopped
      attempt: 0,
      name: '' // set while logged in
    },

    label: function () {
      switch (this.get('state')) {
        case 'connecting': return 'Connecting\u2026';
        case 'connected': return 'Connected';
        case 'relogin': return 'Reconnected, logging in again\u2026';
        case 'disconnected': return 'Disconnected';
        case 'reconnecting': return 'Disconnected \u00b7 reconnecting (attempt ' + this.get('attempt') + ')\u2026';
        case 'stopped': return 'Disconnected';
        default: return this.get('state');
      }
    },

    view: function () {
      return {
        state: this.get('state'),
        label: this.label(),
        name: this.get('state') === 'connected' ? this.get('name') : '',
        canRetry: this.get('state') === 'stopped'
      };
    }
  });

  /*
   * The lobby: online users, chat lines, and what the reader has seen.
   *
   * `horizon` is the highest log position seen; it is the `lastPosition`
   * offered when resuming. Join and leave lines without a position (the
   * seed's userJoined/userLeft carry only a name) that arrived after the
   * horizon are "echo candidates": a history answer or a resume replay sends
   * them again, with positions, and they are matched instead of shown twice.
   */
  var HomeModel = Backbone.Model.extend({
    defaults: function () {
      return {
        me: '',
        online: false,           // connected and logged in: chatting is possible
        historyAvailable: false, // the server sent `history` at least once
        reachedStart: false,
        loadingOlder: false,
        chatError: ''
      };
    },

    initialize: function () {
      this.users = new models.UserCollection();
      this.chats = new models.ChatCollection();
      this.horizon = 0;
      this.session = null;
      this.replayEchoes = [];
    },

    // -- sessions --------------------------------------------------------

    // A `welcome` arrived (first login, re-login, or resume).
    startSession: function (welcome) {
      var before = this.horizon;
      var welcomePosition = toPosition(welcome.position);
      this.session = {
        resumed: !!welcome.resumed,
        before: before,
        welcomePosition: welcomePosition,
        echoes: this.echoCandidates(before),
        liveStart: this.chats.length // history goes before lines that arrive live from here on
      };
      this.replayEchoes = welcome.resumed ? this.echoCandidates(before) : [];
      if (!welcome.resumed && welcomePosition !== undefined) {
        this.horizon = Math.max(this.horizon, welcomePosition);
      }
      this.set({ me: welcome.name, online: true, chatError: '' });
    },

    endSession: function () {
      this.set({ online: false });
    },

    echoCandidates: function (horizon) {
      return this.chats.filter(function (m) {
        var kind = m.get('kind');
        return (kind === 'join' || kind === 'leave') && !m.has('position') && m.get('after') === horizon;
      });
    },

    // -- live events -----------------------------------------------------

    addChat: function (chat) {
      var position = toPosition(chat.position);
      if (position !== undefined && this.replayEchoes.length && position > this.session.before) {
        this.replayEchoes = []; // the replay has moved past what we had seen
      }
      this.addLine({
        kind: 'chat',
        sender: String(chat.sender),
        message: String(chat.message),
        time: chat.time || null,
        position: position
      });
    },

    userJoined: function (name, meta) {
      this.users.addName(name);
      this.addPresence('join', name, meta);
    },

    userLeft: function (name, meta) {
      this.users.removeName(name);
      this.addPresence('leave', name, meta);
    },

    setOnlineUsers: function (names) {
      this.users.resetNames(names);
    },

    addNotice: function (text) {
      return this.chats.add({ kind: 'notice', message: text, after: this.horizon });
    },

    addPresence: function (kind, name, meta) {
      var position = toPosition(meta && meta.position);
      if (position === undefined && this.replayEchoes.length) {
        var echo = this.replayEchoes[0];
        if (echo.get('kind') === kind && echo.get('name') === name) {
          this.replayEchoes.shift(); // shown before the connection dropped
          return;
        }
        this.replayEchoes = [];
      }
      // The seed's events carry no time: show when this page learned of it.
      var time = (meta && meta.time) || new Date().toISOString();
      this.addLine({ kind: kind, name: name, time: time, position: position });
    },

    addLine: function (attrs) {
      if (attrs.position !== undefined) {
        if (this.chats.get(attrs.position)) {
          return; // already shown
        }
        this.horizon = Math.max(this.horizon, attrs.position);
      } else {
        attrs.after = this.horizon;
        delete attrs.position;
      }
      this.chats.add(attrs);
    },

    // -- history ---------------------------------------------------------

    /*
     * The `history` sent after `welcome`: the recent lines, oldest first.
     * Items at or before what we had already seen are skipped; items after
     * the welcome position are skipped too (they are delivered live, as this
     * socket was in the lobby from the welcome on); join/leave items in
     * between first match the position-less lines shown for them.
     */
    mergeHistory: function (history) {
      var session = this.session || { before: this.horizon, welcomePosition: undefined, echoes: [], liveStart: this.chats.length };
      var items = itemsOf(history);
      var echoes = session.echoes.slice();
      var lines = [];
      _.each(items, function (item) {
        var p = item.position;
        if (p <= session.before || this.chats.get(p)) {
          return;
        }
        if (session.welcomePosition !== undefined && p > session.welcomePosition) {
          return;
        }
        if (item.kind !== 'chat' && echoes.length) {
          var echo = echoes[0];
          if (echo.get('kind') === item.kind && echo.get('name') === item.name) {
            echoes.shift();
            echo.set({ position: p, time: echo.get('time') || item.time });
            return;
          }
        }
        lines.push(lineFromItem(item));
      }, this);
      session.echoes = echoes;
      if (lines.length) {
        this.horizon = Math.max(this.horizon, _.last(lines).position);
        this.chats.add(lines, { at: Math.min(session.liveStart, this.chats.length) });
      }
      var firstTime = !this.get('historyAvailable');
      this.set({
        historyAvailable: true,
        // Only the first answer says whether older lines exist before the list.
        reachedStart: firstTime ? !!history.reachedStart : this.get('reachedStart')
      });
    },

    // An older page (the ack of a `history` request): prepend it.
    prependOlder: function (page) {
      var lines = _.filter(_.map(itemsOf(page), lineFromItem), function (line) {
        return !this.chats.get(line.position);
      }, this);
      if (lines.length) {
        this.chats.add(lines, { at: 0 });
      }
      this.set({ reachedStart: !!page.reachedStart || !lines.length, loadingOlder: false });
    }
  });

  function toPosition(value) {
    return typeof value === 'number' && isFinite(value) ? value : undefined;
  }

  // Well-formed history items, oldest first.
  function itemsOf(history) {
    var items = history && _.isArray(history.items) ? history.items : [];
    return _.sortBy(_.filter(items, function (item) {
      return item && toPosition(item.position) !== undefined &&
        (item.kind === 'chat' || item.kind === 'join' || item.kind === 'leave');
    }), 'position');
  }

  function lineFromItem(item) {
    if (item.kind === 'chat') {
      return {
        kind: 'chat', sender: String(item.sender), message: String(item.message),
        time: item.time || null, position: item.position
      };
    }
    return { kind: item.kind, name: String(item.name), time: item.time || null, position: item.position };
  }

  // Which screen is shown: a view instance.
  var ContainerModel = Backbone.Model.extend({
    defaults: { viewState: null }
  });

  _.extend(models, {
    LoginModel: LoginModel,
    ConnectionModel: ConnectionModel,
    HomeModel: HomeModel,
    ContainerModel: ContainerModel
  });
})(ChatApp, Backbone, _);
